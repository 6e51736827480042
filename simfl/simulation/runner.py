"""``python -m simfl.run SCENARIO.yaml``: run one scenario on a local Ray instance or a cluster.

The same from Python: :func:`simulate` (the command line, :func:`main`, is a thin
layer over the same functions). Everything a user can get wrong (the scenario,
the data, the cluster address) is checked before the run directory exists, and
reported in one line (a :class:`~simfl.core.errors.UserError`; exit code 2 at
the command line). The driver then only starts the coordinator and shows progress.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from simfl.core.checkpoint import list_checkpoints, load_latest
from simfl.core.determinism import actor_runtime_env
from simfl.core.errors import UserError
from simfl.core.provenance import environment, mismatches
from simfl.core.resources import GpuShareExceeded, plan_actors
from simfl.data import Dataset, load_dataset
from simfl.data.partition import Partition, client_sizes, make_partition
from simfl.data.sites import require_test_images
from simfl.engine.scenario import Overrides, Scenario, deep_merge, load_scenario, parse_scenario, scenario_to_yaml
from simfl.privacy.evaluator import Evaluator, load_or_train
from simfl.results.run import Run
from simfl.results.summary import arms_table
from simfl.simulation.actors.coordinator import Coordinator

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m simfl.run``."""
    p = argparse.ArgumentParser(prog="python -m simfl.run", description=__doc__.splitlines()[0])
    p.add_argument("scenario", nargs="?", help="scenario YAML file (omit with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a scenario key, e.g. --set training.rounds=3 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint")
    add_ray_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """Where to run: the same flags for a run and for a study."""
    p.add_argument("--address",
                   help="Ray cluster to join ('auto' for the local cluster started by `ray start`/`ray up`); "
                        "default: start a private local Ray instance")
    p.add_argument("--num-cpus", type=int, help="CPUs for the private local Ray instance (default: all)")
    p.add_argument("--no-dashboard", action="store_true", help="do not start Ray's dashboard (local instance only)")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="interface the local dashboard binds to (default 127.0.0.1; 0.0.0.0 exposes it to the network)")


@dataclass(frozen=True)
class RayOptions:
    """Where the actors run: the Ray cluster to join, or the private local instance to start.

    The command lines' ``--address``, ``--num-cpus``, ``--no-dashboard`` and ``--dashboard-host``
    (:func:`add_ray_arguments`); the instance is started once and reused while it runs.
    """

    address: str | None = None  # a cluster to join ('auto': the one `ray start`/`ray up` started); None: start one
    num_cpus: int | None = None  # CPUs of the private local instance (None: all)
    dashboard: bool = False  # Ray's dashboard of the local instance
    dashboard_host: str = "127.0.0.1"  # the interface it binds to (0.0.0.0 exposes it to the network)


def ray_options(args: argparse.Namespace) -> RayOptions:
    """The :class:`RayOptions` of a command line built with :func:`add_ray_arguments`."""
    return RayOptions(args.address, args.num_cpus, not args.no_dashboard, args.dashboard_host)


@dataclass
class Prepared:
    """What a run needs before it starts: the scenario, its data and clients, and the evaluation classifier."""

    scenario: Scenario
    dataset: Dataset
    partition: Partition
    evaluator: Evaluator | None = None  # the attacker-accuracy classifier, when the scenario attacks


def prepare_evaluator(prepared: Prepared, quiet: bool) -> None:
    """Load (or train once and cache) the evaluation classifier attacker accuracy needs."""
    if prepared.scenario.live_attacks is None:
        return
    cache = prepared.scenario.data.derived_path / "evaluators"
    if not quiet:
        print(f"simfl: evaluation classifier for attacker accuracy: {cache} (trained once per dataset)",
              file=sys.stderr)
    try:
        prepared.evaluator, _ = load_or_train(prepared.dataset, cache)
    except OSError as exc:
        raise UserError(f"data.root: cannot write the evaluation classifier's cache in {cache} "
                        f"({exc.strerror or exc})") from None


def prepare(scenario: Scenario) -> Prepared:
    """Load the data and partition the clients: pure, deterministic, and fails before any side effect."""
    sizes = client_sizes(scenario.populations, scenario.seed)
    dataset = load_dataset(scenario.data, int(sizes.sum()), scenario.seed)
    partition = make_partition(
        scenario.populations, dataset.train_y, dataset.num_classes, scenario.seed,
        scenario.evaluation.local_val_fraction, dataset.sites, dataset.train_site,
    )
    require_test_images(scenario.populations, dataset.sites, dataset.test_site)
    return Prepared(scenario, dataset, partition)


# Ray settings of the local instance simfl starts (the cluster configs set the same on every node).
# A client actor's reply, its clients' updates (0.6 MiB each for the default ConvNet), goes back to the
# coordinator inside the call's response instead of through the object store, where Ray's default puts
# every object over 100 KiB: on the 2-core benchmark the raylet, which serves the store, then used
# 0.022 cores instead of 0.044, and the client actors got that CPU. Larger replies still go through the
# store; 8 MiB stays under Ray's 10 MiB limit on the bytes inlined in one response.
# Read-only: ray.init adds its own entries to the dict it is given, so each call gets a copy.
RAY_SYSTEM_CONFIG: Mapping[str, Any] = MappingProxyType({"max_direct_call_object_size": 8 * 2**20})


def connect_ray(options: RayOptions) -> None:
    """Join the cluster at ``options.address``, or start a private local Ray instance; reuse one already running."""
    if ray.is_initialized():  # embedded use (tests, notebooks): reuse the caller's instance
        return
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "configure_logging": True}
    if options.address:
        try:
            ray.init(address=options.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(
                f"--address {options.address}: cannot join a Ray cluster there ({str(exc).splitlines()[0]})"
            ) from None
        return
    ray.init(
        num_cpus=options.num_cpus,
        include_dashboard=options.dashboard,
        dashboard_host=options.dashboard_host,
        _system_config=dict(RAY_SYSTEM_CONFIG),
        **kwargs,
    )


def new_run_dir(scenario: Scenario) -> Path:
    """A not yet existing directory for the scenario's run, where its ``output`` section puts it."""
    return fresh_dir(scenario.output.dir, scenario.output.name, scenario.name)


def fresh_dir(parent: str, name: str | None, default: str) -> Path:
    """``parent/name`` (default ``<default>-<time>``), suffixed ``-1``, ``-2``… past existing ones."""
    base = Path(parent).expanduser()
    name = name or f"{default}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = base / name
    n = 1
    while run_dir.exists():
        run_dir = base / f"{name}-{n}"
        n += 1
    return run_dir


def write_run_header(run_dir: Path, prepared: Prepared) -> None:
    """Create ``run_dir`` (failing if it exists) holding the scenario, the partition it runs and where it runs."""
    run_dir.mkdir(parents=True)
    (run_dir / "scenario.yaml").write_text(scenario_to_yaml(prepared.scenario))
    (run_dir / "environment.json").write_text(json.dumps(environment(), indent=2) + "\n")
    pq.write_table(prepared.partition.to_table(), run_dir / "partition.parquet")


def create_run_dir(prepared: Prepared) -> Path:
    """A fresh run directory with its header; another run taking the same name first is not an error."""
    while True:
        run_dir = new_run_dir(prepared.scenario)
        try:
            write_run_header(run_dir, prepared)
            return run_dir
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"output.dir: cannot create {run_dir} ({exc.strerror})") from None


def check_resumable(run_dir: Path) -> None:
    """Fail in one line, before anything starts, if the run has no readable checkpoint."""
    if not (run_dir / "scenario.yaml").is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no scenario.yaml)")
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"--resume {run_dir}: no checkpoint there (checkpoints/round_*.pt)")
    try:
        load_latest(run_dir)
    except Exception as exc:  # weights_only refusal, truncation, foreign file: all mean "cannot resume"
        raise UserError(f"--resume {run_dir}: {found[-1].name} cannot be read ({type(exc).__name__})") from None


def check_same_partition(run_dir: Path, prepared: Prepared) -> None:
    """A resumed run must see the clients it started with: a replaced dataset file would change them."""
    saved = pq.read_table(run_dir / "partition.parquet")
    if not saved.equals(prepared.partition.to_table()):
        raise UserError(
            f"--resume {run_dir}: the data no longer give the saved partition.parquet "
            f"(was {prepared.scenario.data.name} under data.root replaced?)"
        )


def warn_if_made_elsewhere(run_dir: Path) -> None:
    """A run resumed on another machine, kernel setting or version goes on with this one's numbers: say so."""
    record = run_dir / "environment.json"
    if not record.is_file():
        return
    changed = mismatches(json.loads(record.read_text()), environment())
    if changed:
        print(f"simfl: warning: --resume {run_dir}: started elsewhere ({'; '.join(changed)}); the rounds after "
              "its checkpoint will not match an uninterrupted run", file=sys.stderr)


def plan(prepared: Prepared, elastic: bool) -> int:
    """Client actors (:func:`~simfl.core.resources.plan_actors`) on what the attacker pool leaves of the cluster.

    On an ``elastic`` cluster an attacker pool that does not fit yet is not an error: the autoscaler may add nodes.
    """
    sc = prepared.scenario
    totals = ray.cluster_resources()
    cpus, gpus = totals.get("CPU", 0.0), totals.get("GPU", 0.0)
    if sc.live_attacks is not None:  # the attacker pool comes first: what is left goes to the client actors
        pool = sc.live_attacks.pool
        cpus -= pool.actors * pool.cpus_per_actor
        gpus -= pool.actors * pool.gpus_per_actor
        if not elastic and (cpus < 0 or gpus < -1e-9):
            raise UserError(f"attacks.pool: {pool.actors} attacker actors x {pool.cpus_per_actor:g} CPUs, "
                            f"{pool.gpus_per_actor:g} GPUs do not fit the cluster's {totals.get('CPU', 0.0):g} CPUs, "
                            f"{totals.get('GPU', 0.0):g} GPUs")
    try:
        return plan_actors(sc.resources, max(cpus, 0.0), max(gpus, 0.0), prepared.partition.num_clients,
                           elastic=elastic)
    except UserError as exc:
        if sc.live_attacks is None:
            raise
        raise UserError(f"{exc} (what is left after attacks.pool)") from None


def start_coordinator(run_dir: Path, prepared: Prepared, n_actors: int, resume: bool):
    """The coordinator actor, pinned to this node (it writes the run directory), with the data in the object store."""
    sc = prepared.scenario
    refs = {"dataset": ray.put(prepared.dataset), "partition": ray.put(prepared.partition)}
    if prepared.evaluator is not None:
        refs["evaluator"] = ray.put(prepared.evaluator)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Coordinator.options(  # type: ignore[attr-defined]  # Ray's decorator adds .options
        num_cpus=sc.resources.coordinator_cpus, scheduling_strategy=here, runtime_env=actor_runtime_env()
    ).remote(sc.model_dump(mode="json"), str(run_dir), refs, n_actors, resume)


def execute(run_dir: Path, prepared: Prepared, n_actors: int, resume: bool, quiet: bool) -> dict:
    """Start the coordinator and drive it round by round, with a progress bar."""
    sc = prepared.scenario
    coordinator = start_coordinator(run_dir, prepared, n_actors, resume)
    info_ref = coordinator.info.remote()
    waited = 0
    while not ray.wait([info_ref], timeout=30)[0]:
        waited += 30
        print(f"simfl: still waiting for resources for {n_actors} client actors after {waited} s "
              f"(each asks {sc.resources.cpus_per_actor:g} CPU, {sc.resources.gpus_per_actor:g} GPU)",
              file=sys.stderr)
    info = ray.get(info_ref)
    bar = tqdm(total=sc.training.rounds, initial=info["round"], unit="round", disable=quiet, dynamic_ncols=True,
               desc=f"{sc.name} · {info['clients']} clients · {n_actors} actors")
    last: dict = {}
    try:
        while (summary := ray.get(coordinator.run_round.remote())) is not None:
            last.update(summary)
            postfix = {"loss": f"{summary['train_loss']:.3f}"}
            if "test_accuracy" in last:
                postfix["test_acc"] = f"{last['test_accuracy']:.3f}"
            bar.set_postfix(postfix)
            bar.update(1)
        ray.get(coordinator.finish.remote())
    finally:
        bar.close()
        ray.kill(coordinator)
    return last


# What :func:`simulate` takes: a scenario as a file, as the mapping its YAML holds, or validated
# (overrides: :data:`simfl.engine.scenario.Overrides`).
ScenarioSource = str | Path | Mapping[str, Any] | Scenario


def simulate(scenario: ScenarioSource | None = None, overrides: Overrides | None = None, *,
             resume: str | Path | None = None, address: str | None = None, num_cpus: int | None = None,
             dashboard: bool = False, quiet: bool = True) -> Run:
    """Run a scenario (each of its arms, if it has ``arms``) and open the run directory it wrote.

    ``scenario``: a YAML file, a mapping as the YAML would hold, or a :class:`Scenario`;
    ``overrides``: ``["training.rounds=3"]`` as ``--set`` takes them, or ``{"training.rounds": 3}``.
    ``resume``: a killed run's directory to continue (then no scenario). Ray: joins the cluster at
    ``address``, or starts a private local instance (``num_cpus``, ``dashboard``) and leaves it
    running for the next call; an instance already started (``ray.init``) is used as it is.
    ``quiet``: no progress bar. Bad input raises :class:`UserError` with the command line's
    one-line message, before any run directory exists.
    """
    loaded, top = load_run(scenario, overrides, resume)
    try:
        run_dir, _ = run_scenario_or_arms(loaded, top, RayOptions(address, num_cpus, dashboard), quiet=quiet)
    except GpuShareExceeded as exc:
        raise gpu_share_cause(exc) from None
    return Run(run_dir)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a user error, reported in one line)."""
    args = build_parser().parse_args(argv)
    try:
        scenario, top = load_run(args.scenario or None, args.overrides, args.resume or None)
        run_dir, last = run_scenario_or_arms(scenario, top, ray_options(args), quiet=args.quiet)
    except UserError as exc:
        print(f"simfl: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except GpuShareExceeded as exc:
        print(f"simfl: error: {gpu_share_cause(exc)}", file=sys.stderr)
        return 1
    if scenario.arms is not None:
        print((run_dir / "summary.md").read_text().rstrip("\n"))
    acc = f", test accuracy {last['test_accuracy']:.4f}" if "test_accuracy" in last else ""
    print(f"simfl: finished {scenario.training.rounds} rounds{acc}; results in {run_dir}")
    return 0


def gpu_share_cause(exc: BaseException) -> BaseException:
    """The :class:`GpuShareExceeded` an actor raised, out of Ray's wrapping (possibly twice: client -> coordinator)."""
    while (cause := getattr(exc, "cause", None)) is not None:
        exc = cause
    return exc


def load_run(scenario: ScenarioSource | None, overrides: Overrides | None, resume: str | Path | None
             ) -> tuple[Scenario, Path | None]:
    """The scenario to run and, resuming, the run directory it continues; checked before anything starts."""
    if resume is not None:
        if scenario is not None or overrides:
            raise UserError("--resume: a resumed run uses its saved scenario.yaml; drop the scenario and --set")
        top = Path(resume)
        if not (top / "scenario.yaml").is_file():
            raise UserError(f"--resume {top}: not a run directory (no scenario.yaml)")
        return load_scenario(top / "scenario.yaml"), top
    if scenario is None:
        raise UserError("give a scenario file, or --resume RUN_DIR")
    return scenario_from(scenario, overrides), None


def scenario_from(source: ScenarioSource, overrides: Overrides | None = None) -> Scenario:
    """A validated scenario from a file, a mapping or a :class:`Scenario`, with the overrides laid over it."""
    if isinstance(source, str | Path):
        return load_scenario(source, overrides)  # laid over the file as written, as `--set` is
    if isinstance(source, Scenario):
        return parse_scenario(source.model_dump(mode="json"), overrides)
    if isinstance(source, Mapping):
        return parse_scenario(dict(source), overrides)
    raise UserError(f"scenario: expected a YAML file, a mapping or a Scenario, not {type(source).__name__}")


def run_scenario_or_arms(scenario: Scenario, resume: Path | None, options: RayOptions, *, quiet: bool
                         ) -> tuple[Path, dict]:
    """The scenario's run, or its arms' runs under one parent: the directory, and the last round's summary."""
    if scenario.arms is None:
        return run_scenario(scenario, resume, options, quiet=quiet)
    return run_arms(scenario, resume, options, quiet=quiet)


def run_scenario(scenario: Scenario, resume: Path | None, options: RayOptions, *, quiet: bool
                 ) -> tuple[Path, dict]:
    """One run: fresh into a new run directory, or resumed from ``resume``; a failed fresh run leaves nothing."""
    if resume is not None:
        check_resumable(resume)
    prepared = prepare(scenario)
    if resume is not None:
        check_same_partition(resume, prepared)
        warn_if_made_elsewhere(resume)
    return run_planned(prepared, plan_run(prepared, options, quiet=quiet), resume, quiet=quiet)


def run_planned(prepared: Prepared, n_actors: int, resume: Path | None, *, quiet: bool) -> tuple[Path, dict]:
    """Run what is prepared and planned: into a new run directory, or on from ``resume``'s checkpoint."""
    run_dir = resume
    created = False
    try:
        if resume is None:
            run_dir = create_run_dir(prepared)
            created = True
        assert run_dir is not None  # resumed, or just created
        last = execute(run_dir, prepared, n_actors, resume=resume is not None, quiet=quiet)
    except BaseException:
        _discard(run_dir, created)
        raise
    return run_dir, last


def plan_run(prepared: Prepared, options: RayOptions, *, quiet: bool) -> int:
    """Join Ray, fit the actors to it and have the evaluation classifier ready: the last checks before writing."""
    connect_ray(options)
    n_actors = plan(prepared, elastic=bool(options.address))
    prepare_evaluator(prepared, quiet)
    return n_actors


def run_arms(scenario: Scenario, resume: Path | None, options: RayOptions, *, quiet: bool) -> tuple[Path, dict]:
    """Every arm of the scenario in turn, each a complete run directory under one parent.

    All arms are validated, their data loaded and their actors planned before
    anything is written (arms with the same data and partition share one copy). On ``--resume``,
    finished arms are skipped, killed ones resumed and missing ones started. The arms'
    table goes to ``summary.md``.
    """
    parent = resume or new_run_dir(scenario)
    prepared = prepare_under(parent, scenario.arm_scenarios(), options, quiet=quiet)
    if resume is None:
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise UserError(f"output.dir: cannot create {parent} ({exc.strerror})") from None
        (parent / "scenario.yaml").write_text(scenario_to_yaml(scenario))
    try:
        last = _run_each_arm(parent, prepared, quiet=quiet)
    except BaseException:
        if resume is None and not any(p.is_dir() for p in parent.iterdir()):
            shutil.rmtree(parent, ignore_errors=True)  # no arm got as far as a run directory
        raise
    (parent / "summary.md").write_text(arms_table(parent) + "\n")
    return parent, last


def prepare_under(parent: Path, scenarios: dict[str, Scenario], options: RayOptions, *, quiet: bool
                  ) -> dict[str, tuple[Prepared, int]]:
    """Each scenario set to write ``parent/<name>``, its data loaded and its actors planned.

    Scenarios with the same data and partition share one copy (and one evaluation classifier).
    """
    prepared: dict[str, tuple[Prepared, int]] = {}
    for name, sc in scenarios.items():
        sc = Scenario.model_validate(deep_merge(sc.model_dump(mode="json"),
                                                {"output": {"dir": str(parent), "name": name}}))
        same = next((p for p, _ in prepared.values() if same_data(p.scenario, sc)), None)
        prep = Prepared(sc, same.dataset, same.partition, same.evaluator) if same else prepare(sc)
        prepared[name] = (prep, plan_run(prep, options, quiet=quiet))
    return prepared


def _run_each_arm(parent: Path, prepared: dict[str, tuple[Prepared, int]], *, quiet: bool) -> dict:
    last: dict = {}
    for name, (prep, n_actors) in prepared.items():
        print(f"simfl: arm {name} (defence: {prep.scenario.defence.kind})", file=sys.stderr)
        out = run_in(parent / name, prep, n_actors, quiet=quiet)
        if out is None:
            print(f"simfl: arm {name}: finished already, skipped", file=sys.stderr)
        else:
            last = out[1]
    return last


def run_in(run_dir: Path, prep: Prepared, n_actors: int, *, quiet: bool) -> tuple[Path, dict] | None:
    """Run ``prep`` into ``run_dir`` whatever state a killed parent (arms, study) left it in.

    Finished (final weights saved): nothing to do, returns None. Checkpointed:
    resumed. Started but never checkpointed: discarded and started again.
    """
    if (run_dir / "final_weights.pt").is_file():
        return None
    if run_dir.is_dir() and not list_checkpoints(run_dir):
        shutil.rmtree(run_dir)
    if not run_dir.is_dir():
        return run_planned(prep, n_actors, None, quiet=quiet)
    check_resumable(run_dir)
    check_same_partition(run_dir, prep)
    warn_if_made_elsewhere(run_dir)
    return run_planned(prep, n_actors, run_dir, quiet=quiet)


def same_data(a: Scenario, b: Scenario) -> bool:
    """Arms that load the same data and partition them the same way."""
    keys = ("seed", "data", "populations")
    return all(getattr(a, k) == getattr(b, k) for k in keys) and (
        a.evaluation.local_val_fraction == b.evaluation.local_val_fraction
    )


def _discard(run_dir: Path | None, created: bool) -> None:
    """Leave no half-written run behind: a new run with no checkpoint and no round written is removed."""
    if not created or run_dir is None:
        return
    if not list_checkpoints(run_dir) and not any((run_dir / "rounds").glob("part-*.parquet")):
        shutil.rmtree(run_dir, ignore_errors=True)
