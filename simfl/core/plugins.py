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
chosen plugin's. Adding a plugin is its module, its tests and one import line
in its package's ``__init__``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BeforeValidator, Discriminator, Tag

from simfl.core.validation import Strict, kind_shorthand

P = TypeVar("P", bound=type)


class PluginConfig(Strict):
    """A plugin's config: ``kind`` (a one-value Literal, the plugin's name) and its knobs."""

    kind: str

    def knobs(self) -> dict[str, Any]:
        """Every knob, defaults filled in (what a run logs beside the plugin's name)."""
        return self.model_dump(mode="json", exclude={"kind"})

    def check(self, scenario: Any) -> None:
        """Checks against the rest of the (otherwise valid) scenario; raise ValueError naming the keys."""


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

    def register(self, config: type[PluginConfig]) -> Callable[[P], P]:
        """Class decorator: register the plugin under its config's ``kind``."""
        kind = config.model_fields["kind"].default
        if not isinstance(kind, str):
            raise TypeError(f"{config.__name__}.kind needs a default: the plugin's name")

        def add(plugin: P) -> P:
            if kind in self.plugins and self.plugins[kind] is not plugin:
                raise ValueError(f"{self.family} {kind!r} is registered twice")
            self.plugins[kind] = plugin
            self.configs[kind] = config
            plugin.config_class = config  # type: ignore[attr-defined]
            plugin.kind = kind  # type: ignore[attr-defined]
            return plugin

        return add

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
        return Annotated[
            union,
            Discriminator(discriminate, custom_error_type="unknown_plugin", custom_error_message=message),
            BeforeValidator(kind_shorthand),
        ]
