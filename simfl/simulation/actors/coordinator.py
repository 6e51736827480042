"""The coordinator actor: runs the rounds, keeps the run's state, checkpoints it.

It owns the run: the global weights, the server optimiser and the defence's
server side, and the run directory (tables, TensorBoard, checkpoints). What a
round does is plain code (:class:`simfl.engine.round.Rounds`: plan, aggregate, the
defence's step); the client actors are reached through a transport
(:class:`simfl.simulation.actors.transport.RayTransport`), attacks through the attacker pool,
and results go to the sinks (:class:`simfl.engine.run_log.RunLog`). It runs on the
driver's node so that the run directory is local, and it sends the global
weights once per round per actor through the object store, never once per client.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import ray
import torch

from simfl.core.aggregation import ServerOptimizer
from simfl.core.checkpoint import load_latest, save_checkpoint
from simfl.core.determinism import pin_cpu_kernels
from simfl.core.resources import torch_threads
from simfl.core.seeding import derive_seed
from simfl.core.weights import FlatWeights
from simfl.data import Dataset
from simfl.data.client_data import test_sets
from simfl.data.partition import Partition
from simfl.engine.attack_log import AttackLog
from simfl.engine.messages import TrainTask
from simfl.engine.recorded_jobs import job_from_state, job_state, record_jobs, recorded_jobs
from simfl.engine.round import RoundPlan, Rounds, attack_jobs, central_eval_rows
from simfl.engine.run_log import RunLog
from simfl.engine.scenario import Scenario, scenario_to_yaml
from simfl.engine.victim import Victim
from simfl.privacy.defences import defended_model
from simfl.simulation.actors.attacker import AttackerKnowledge, AttackPool
from simfl.simulation.actors.transport import RayTransport


@ray.remote
class Coordinator:
    """The run's coordinator actor (see the module docstring): ``run_round`` until it returns None, then ``finish``."""

    def __init__(self, scenario: dict, run_dir: str, refs: dict, n_actors: int, resume: bool) -> None:
        # ``refs`` wraps the dataset and partition object refs, so Ray hands them to us
        # unresolved and each client actor fetches them from the object store itself.
        self.sc = Scenario.model_validate(scenario)
        self.run_dir = Path(run_dir)
        pin_cpu_kernels(torch_threads(max(self.sc.resources.coordinator_cpus, 1.0)))
        dataset: Dataset = ray.get(refs["dataset"])
        self.partition: Partition = ray.get(refs["partition"])

        torch.manual_seed(derive_seed(self.sc.seed, "model-init"))
        shape = (dataset.channels, dataset.image_size, dataset.num_classes)
        self.model, self.defence = defended_model(self.sc.model, self.sc.defence, self.sc.seed, shape)
        self.flat = FlatWeights(self.model)
        self.weights = self.flat.snapshot()
        self.defence.server_setup(dataset, self.model)
        self.server = ServerOptimizer(self.sc.training.algorithm, self.flat.trainable)
        self.rounds = Rounds(self.sc, self.partition, self.defence, self.server)
        names = self.partition.populations
        self.test_sets = test_sets(dataset, self.sc.populations, self.sc.seed)
        self.held_out = {name: bool(h) for name, h in zip(names, self.partition.held_out, strict=True)}

        self.round = 0
        journal: dict[int, dict[str, int]] = {}
        restored_jobs: list[dict] = []
        manifest = None
        if resume:
            journal, restored_jobs, manifest = self._restore()
            if self.sc.live_attacks is not None and not manifest.get("attacks"):
                # Recorded by this run (``attacks.record``) and not yet attacked: attack them now, as pending jobs.
                restored_jobs += recorded_jobs(self.run_dir, self.round)
        self.log = RunLog(self.run_dir, self.sc.output.flush_seconds, scenario_to_yaml(self.sc),
                          (self.round, manifest) if manifest is not None else None)
        run_tag = f"{self.run_dir.name}-{uuid.uuid4().hex[:8]}"  # unique per run: two runs may share a dir name
        # A finished run resumed to attack its recorded jobs trains nothing: no client actors.
        self.transport = (RayTransport(self.sc, self.partition, refs, n_actors, run_tag, journal)
                          if self.round < self.sc.training.rounds else None)
        self.attack_pool = self._start_attacks(dataset, refs, run_tag, resume, restored_jobs)

    # ------------------------------------------------------------ setup

    def _restore(self) -> tuple[dict[int, dict[str, int]], list[dict], dict[str, list[str]]]:
        """The checkpoint's round, weights and server state; returns its journal, pending attacks and manifest."""
        state = load_latest(self.run_dir)
        if state is None:
            raise RuntimeError(f"{self.run_dir} has no checkpoint to resume from")
        self.round = int(state["round"])
        self.weights = state["weights"]
        self.server.load_state_dict(state["server"])
        self.defence.load_server_state(state.get("defence", {}))
        journal = {int(c): dict(s) for c, s in state["journal"].items()}
        return journal, state.get("attack_jobs", []), state["manifest"]

    def _start_attacks(self, dataset: Dataset, refs: dict, run_tag: str, resume: bool,
                       restored_jobs: list[dict]) -> AttackPool | None:
        """The attacker pool, whose results stream in between rounds (see AttackLog); None without live attacks."""
        if self.sc.live_attacks is None:
            return None
        pop, names = self.partition.client_population, self.partition.populations
        self.attack_log = AttackLog(
            self.run_dir, self.log.tables, lambda c: names[pop[c]],
            resumed_round=self.round if resume else None, rerun_rounds={job["round"] for job in restored_jobs},
        )
        knowledge = AttackerKnowledge.from_dataset(dataset, ray.get(refs["evaluator"]), self.sc.seed)
        pool = AttackPool.start(self.sc.model_dump(mode="json"), knowledge, run_tag, self.attack_log.done)
        # In flight at the checkpoint we resume from: run them again (waiting for room, never dropped).
        for job in self.attack_log.expect([job_from_state(j) for j in restored_jobs]):
            while not self._submit_attack(pool, job):
                pool.wait_for_one()
        return pool

    def info(self) -> dict:
        """Where the run stands (the round to resume from) and where its actors run."""
        return {"round": self.round, "actors": self.transport.info if self.transport is not None else [],
                "clients": int(self.partition.num_clients)}

    def global_weights(self) -> torch.Tensor:
        """The current global weights (benchmarks replay rounds from them)."""
        return self.weights.clone()

    # ------------------------------------------------------------ one round

    def run_round(self) -> dict | None:
        """Train one round; returns a summary for the progress bar, or None when the run is complete."""
        if self.round >= self.sc.training.rounds:
            return None
        started = time.perf_counter()
        assert self.transport is not None  # created whenever rounds are left
        plan = self.rounds.plan(self.round + 1)
        replies, reruns = self.transport.train(
            TrainTask(plan.round, plan.cohort.tolist(), victims=sorted(plan.victims)), self.weights, plan.broadcast)
        victims = [r.victim for r in replies if r.victim is not None]
        if len(plan.probes):  # held-out clients probed as if they had joined: attacked, never aggregated
            probed, probe_reruns = self.transport.train(
                TrainTask(plan.round, plan.probes.tolist(), probe=True), self.weights, plan.broadcast)
            victims += [r.victim for r in probed if r.victim is not None]
            reruns += probe_reruns
        dropped = self._attack(plan, victims)
        agg = self.rounds.aggregate(plan, self.weights, replies)
        self.weights = agg.weights
        self.log.training(agg)
        self.flat.load(self.weights)
        figures = self.rounds.defence_step(plan.round, self.model, agg.client_rows)
        defence = self.log.defence(plan.round, self.sc.defence.kind, self.sc.defence.knobs(), figures)
        summary = {"round": plan.round, "train_loss": agg.train_loss, "train_accuracy": agg.train_accuracy}
        if plan.evaluate:
            summary["test_accuracy"] = self._evaluate(plan.round)
        seconds = time.perf_counter() - started
        self.log.round(agg.round_row(reruns, len(victims), dropped, defence, seconds, time.time()))
        self.round = plan.round
        self._persist()
        return {**summary, "round_time_s": seconds}

    def _evaluate(self, r: int) -> float:
        """Central test sets here, local validation splits on the client actors; returns global test accuracy."""
        self.flat.load(self.weights)
        central = central_eval_rows(r, self.model, self.test_sets, self.held_out, self.sc.evaluation.batch_size)
        per_client: list[dict] = []
        per_population: list[dict] = []
        if self.sc.evaluation.local_val_fraction > 0:
            assert self.transport is not None
            local = self.transport.evaluate(r, self.weights, self.rounds.local_eval_clients(r))
            per_client, per_population = self.rounds.local_eval_rows(r, local)
        self.log.evaluation(r, central, per_client, per_population)
        return central[0]["accuracy"]

    # ------------------------------------------------------------ attacks

    def _attack(self, plan: RoundPlan, victims: list[Victim]) -> int:
        """Hand this round's victims, with the defence broadcast they trained under, to the attacker pool.

        Returns how many were dropped.
        """
        if self.sc.attacks is None:
            return 0
        # One tensor for the round's global weights: Ray and checkpoints then carry it once per job, not per victim.
        victims = [
            replace(v, observation=replace(v.observation, weights=self.weights))
            if torch.equal(v.observation.weights, self.weights) else v
            for v in victims
        ]
        jobs = [{"round": plan.round, "victims": group, "context": plan.broadcast}
                for group in attack_jobs(victims, self.sc.attacks.victims_per_job)]
        if self.attack_pool is None:  # attacks.record: kept for a later attack, none dropped
            if jobs:
                record_jobs(self.run_dir, plan.round, jobs)
            return 0
        dropped = 0
        for job in self.attack_log.expect(jobs):
            if not self._submit_attack(self.attack_pool, job):
                dropped += len(job["victims"])
                self.attack_log.settle(plan.round)
        if dropped:
            print(f"simfl: round {plan.round}: attack pool full, {dropped} victims not attacked "
                  "(attacks.pool.when_full: drop; counted in rounds.attack_victims_dropped)", file=sys.stderr)
        self.attack_pool.collect(timeout=0)
        return dropped

    @staticmethod
    def _submit_attack(pool: AttackPool, job: dict) -> bool:
        job["submitted_at"] = time.time()
        return pool.submit(job)

    # ------------------------------------------------------------ persistence

    def _persist(self) -> None:
        """A checkpoint when one is due (and at the last round), else a timed flush of the tables."""
        every = self.sc.checkpoint.every
        if (every and self.round % every == 0) or self.round == self.sc.training.rounds:
            self._checkpoint()
        else:
            self.log.tables.maybe_flush()

    def _checkpoint(self) -> None:
        assert self.transport is not None  # checkpoints follow rounds, which need client actors
        self.log.flush()
        if self.attack_pool is not None:
            self.attack_log.flush()
        save_checkpoint(
            self.run_dir,
            self.round,
            {
                "weights": self.weights,
                "server": self.server.state_dict(),
                "journal": self.transport.journal,
                "manifest": self.log.tables.manifest(),
                "defence": self.defence.server_state(),
                # Attacks still running: their results are not in the manifest, so a resume re-runs them.
                "attack_jobs": [job_state(job) for job in (self.attack_pool.jobs() if self.attack_pool else [])],
            },
            keep=self.sc.checkpoint.keep,
        )

    def finish(self) -> dict:
        """Wait for pending attacks, flush everything, save the final model and stop the actors."""
        if self.attack_pool is not None:
            self.attack_pool.drain()
            self.attack_pool.stop()
            self.attack_log.close()
        self.log.close()
        if self.transport is not None:
            self.transport.stop()
        # Its presence marks the run finished (a study or arms resume skips it): write it whole or not at all.
        tmp = self.run_dir / ".final_weights.pt.tmp"
        torch.save({"weights": self.weights}, tmp)
        os.replace(tmp, self.run_dir / "final_weights.pt")
        return {"round": self.round}
