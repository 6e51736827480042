"""Plugins (defences, attacks): defined, configured and registered in one place.

A plugin module defines its config (a :class:`PluginConfig` with typed knobs,
real defaults and its own validators) and registers its class with it::

    class DPSGDConfig(PluginConfig):
        kind: Literal["dpsgd"] = "dpsgd"
        noise_multiplier: NonNegativeFloat = 1.0

    @DEFENCES.register(DPSGDConfig)
    class DPSGD(Defence): ...

The scenario's ``defence`` and each ``attacks.methods`` entry are then a union
of the registered configs, discriminated by ``kind`` (:meth:`Registry.config_type`),
so no central table lists a plugin's knobs and a saved scenario holds only the
chosen plugin's. A built-in plugin is its module, its tests and one import line
in its package's ``__init__``.

Third-party plugins need no edit to simfl: a distribution declares an entry
point in the family's group (``simfl.defences``, ``simfl.attacks``) naming the
module whose import registers it, and the family's ``__init__`` loads them
right after the built-ins (:meth:`Registry.load_entry_points`), before any
scenario union is built. A plugin that fails to load says so in one line on
stderr (once, not again in each Ray worker) and is skipped: the built-ins and
every other plugin still load.
"""

from __future__ import annotations

import functools
import operator
import os
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint, entry_points
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BeforeValidator, Discriminator, Tag

from simfl.core.validation import Strict, kind_shorthand

P = TypeVar("P", bound=type)
# The environment variable holding the plugin failures already reported (one a line), for child processes.
REPORTED = "SIMFL_PLUGIN_FAILURES_REPORTED"


class PluginConfig(Strict):
    """A plugin's config: ``kind`` (a one-value Literal, the plugin's name) and its knobs."""

    kind: str

    def knobs(self) -> dict[str, Any]:
        """Every knob, defaults filled in (what a run logs beside the plugin's name)."""
        return self.model_dump(mode="json", exclude={"kind"})

    def check(self, scenario: Any) -> None:
        """Checks against the rest of the (otherwise valid) scenario; raise ValueError naming the keys."""


def _distribution(point: EntryPoint) -> str:
    """``name version`` of the distribution that declares ``point`` (how a user finds the plugin to fix or remove)."""
    dist = point.dist
    return f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"


def _warn_once(line: str) -> None:
    """``line`` on stderr, unless a parent process already said it.

    Processes started from this one (Ray's workers on this machine, subprocesses)
    inherit the environment and load the same plugins: ``REPORTED`` in it keeps
    them from saying the same thing again, once per worker.
    """
    said = os.environ.get(REPORTED, "").split("\n")
    if line not in said:
        print(f"simfl: warning: {line}", file=sys.stderr)
        os.environ[REPORTED] = "\n".join([*filter(None, said), line])


def _tag(kind: str) -> str:
    # With a '-', so that error key paths drop it like pydantic's own union labels (validation.key_path).
    return f"kind-{kind}"


class Registry(Generic[P]):
    """The registered plugins of one family, by ``kind``, with their config classes."""

    def __init__(self, family: str, default: str | None = None) -> None:
        self.family = family
        self.default = default  # the kind of a mapping without `kind` (e.g. `defence: {}` is no defence)
        self.plugins: dict[str, P] = {}
        self.configs: dict[str, type[PluginConfig]] = {}
        self.loaded: set[EntryPoint] = set()  # entry points already tried, loaded or not
        self.failed: dict[str, str] = {}  # "'entry point' (distribution version)" -> why it did not load

    def register(self, config: type[PluginConfig]) -> Callable[[P], P]:
        """Class decorator: register the plugin under its config's ``kind``."""
        kind = config.model_fields["kind"].default
        if not isinstance(kind, str):
            raise TypeError(f"{config.__name__}.kind needs a default: the plugin's name")

        def add(plugin: P) -> P:
            if kind in self.plugins and self.plugins[kind] is not plugin:
                first, second = (f"{p.__module__}.{p.__qualname__}" for p in (self.plugins[kind], plugin))
                raise ValueError(f"{self.family} {kind!r} is registered twice ({first} and {second})")
            self.plugins[kind] = plugin
            self.configs[kind] = config
            plugin.config_class = config  # type: ignore[attr-defined]
            plugin.kind = kind  # type: ignore[attr-defined]
            return plugin

        return add

    def load_entry_points(self, group: str) -> None:
        """Import every installed plugin of entry point ``group``; its import registers it as a built-in's does.

        Each entry point is tried once per process (calling again loads only
        newly installed ones). One that fails (import error, an exception while
        registering, a kind already taken) is skipped with one line on stderr
        and kept in :attr:`failed`; whatever it registered before failing is
        removed, so a half-loaded plugin never reaches a scenario.
        """
        for point in entry_points(group=group):
            if point in self.loaded:
                continue
            self.loaded.add(point)
            before = set(self.plugins)
            try:
                point.load()
            except Exception as exc:  # a plugin may fail in any way; it must not stop simfl or other plugins
                for kind in set(self.plugins) - before:
                    del self.plugins[kind], self.configs[kind]
                lines = str(exc).strip().splitlines()
                plugin = f"{point.name!r} ({_distribution(point)})"
                self.failed[plugin] = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
                _warn_once(f"{self.family} plugin {plugin} not loaded: {self.failed[plugin]}")

    def kinds(self) -> list[str]:
        """Registered kinds, in registration order."""
        return list(self.plugins)

    def __getitem__(self, kind: str) -> P:
        return self.plugins[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self.plugins)

    def __contains__(self, kind: object) -> bool:
        return kind in self.plugins

    def config_type(self) -> Any:
        """The config union for a scenario field: ``name`` or ``{kind: name, knob: value, ...}``."""

        def discriminate(value: Any) -> str | None:
            kind = value.get("kind", self.default) if isinstance(value, dict) else getattr(value, "kind", None)
            return _tag(kind) if kind in self.configs else None

        union = functools.reduce(operator.or_, [Annotated[c, Tag(_tag(k))] for k, c in self.configs.items()])
        message = f"unknown {self.family}; choose one of: {', '.join(self.configs)}"
        if self.failed:
            message += f" (plugins that failed to load: {', '.join(self.failed)})"
        return Annotated[
            union,
            Discriminator(discriminate, custom_error_type="unknown_plugin", custom_error_message=message),
            BeforeValidator(kind_shorthand),
        ]
