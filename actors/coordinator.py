"""The coordinator actor: samples clients, dispatches, aggregates, evaluates, checkpoints.

It owns the run: the global weights, the server optimiser, the journal of
client states (what a restarted client actor is given back), the run tables
and TensorBoard. It runs on the driver's node so that the run directory is
local, and it sends the global weights once per round per actor through the
object store, never once per client.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError
from torch.utils.tensorboard import SummaryWriter

from actors.attacker import AttackerKnowledge, AttackPool
from actors.client import ClientShard, ShardNotAttached, new_client_state
from simfl.aggregation import ServerOptimizer, weighted_mean
from simfl.attack_log import AttackLog
from simfl.attacks.victim import Victim, victim_from_state, victim_state
from simfl.checkpoint import load_latest, save_checkpoint
from simfl.client_data import population_test_set
from simfl.config import Scenario, scenario_to_yaml
from simfl.data import Dataset
from simfl.defences import defended_model
from simfl.partition import Partition
from simfl.resources import assign_clients, torch_threads
from simfl.scheduling import RoundSchedule
from simfl.seeding import derive_seed, rng
from simfl.tables import CLIENT_DEFENCE_COLUMNS, RunTables
from simfl.training import evaluate
from simfl.weights import FlatWeights

# How many chunks per actor may fail within one round before the run gives up.
MAX_RERUNS_PER_ROUND = 3
# How long a round waits on silent actors before saying so (it keeps waiting).
WAIT_REPORT_S = 60


def sample_cohort(sc: Scenario, eligible: np.ndarray, round_: int) -> np.ndarray:
    """This round's clients, from (seed, round) alone: independent of actors and of resumes."""
    k = sc.training.cohort_size(len(eligible))
    return np.sort(rng(sc.seed, "sample", round_).choice(eligible, size=k, replace=False))


def sample_victims(sc: Scenario, cohort: np.ndarray, round_: int) -> set[int]:
    """This round's attacked clients among its cohort, from (seed, round) alone."""
    if sc.attacks is None or not sc.attacks.attacked(round_):
        return set()
    k = sc.attacks.victim_count(len(cohort))
    return {int(c) for c in rng(sc.seed, "victims", round_).choice(cohort, size=k, replace=False)}


def sample_held_out_victims(sc: Scenario, held_out_clients: np.ndarray, round_: int) -> np.ndarray:
    """This round's probed held-out clients (``attacks.held_out_victims``), sorted, from (seed, round) alone."""
    if sc.attacks is None or not sc.attacks.attacked(round_) or not sc.attacks.held_out_victims:
        return np.zeros(0, dtype=np.int64)
    k = min(sc.attacks.held_out_victims, len(held_out_clients))
    return np.sort(rng(sc.seed, "held-out-victims", round_).choice(held_out_clients, size=k, replace=False))


def attack_jobs(victims: list[Victim], per_job: int) -> list[list[Victim]]:
    """Victims in client-id order, split into stackable groups of at most ``per_job``."""
    groups: dict[tuple, list[Victim]] = {}
    for v in sorted(victims, key=lambda v: v.client_id):
        groups.setdefault(v.group, []).append(v)
    return [g[i : i + per_job] for g in groups.values() for i in range(0, len(g), per_job)]


@ray.remote
class Coordinator:
    def __init__(
        self,
        scenario: dict,
        run_dir: str,
        refs: dict,
        n_actors: int,
        resume: bool,
    ) -> None:
        # ``refs`` wraps the dataset and partition object refs, so Ray hands them to us
        # unresolved and each client actor fetches them from the object store itself.
        self.sc = Scenario.model_validate(scenario)
        self.run_dir = Path(run_dir)
        torch.set_num_threads(torch_threads(max(self.sc.resources.coordinator_cpus, 1.0)))
        dataset: Dataset = ray.get(refs["dataset"])
        self.partition: Partition = ray.get(refs["partition"])
        self.pop_names = self.partition.populations
        self.held_out = self.partition.held_out

        torch.manual_seed(derive_seed(self.sc.seed, "model-init"))
        shape = (dataset.channels, dataset.image_size, dataset.num_classes)
        self.model, self.defence = defended_model(self.sc, shape)
        self.flat = FlatWeights(self.model)
        self.weights = self.flat.snapshot()
        self.defence.server_setup(dataset, self.model)
        self.server = ServerOptimizer(self.sc.training.algorithm, self.flat.trainable)
        self.test_sets = self._test_sets(dataset)

        pop = self.partition.client_population
        self.train_clients = np.flatnonzero(~self.held_out[pop])
        self.held_out_clients = np.flatnonzero(self.held_out[pop])
        self.owner = assign_clients(self.partition.sizes, n_actors)
        self.journal: dict[int, dict[str, int]] = {}
        self.round = 0
        self.round_victims: set[int] = set()
        restored_jobs: list[dict] = []

        self.tables = RunTables(self.run_dir, self.sc.output.flush_seconds)
        purge = None
        if resume:
            purge, restored_jobs = self._restore()
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)
        if not resume:
            # Markdown code block, so TensorBoard's text tab shows the scenario verbatim.
            self.tb.add_text("scenario", "```yaml\n" + scenario_to_yaml(self.sc) + "```", 0)

        res = self.sc.resources
        run_tag = uuid.uuid4().hex[:8]
        self.actors = [
            ClientShard.options(
                num_cpus=res.cpus_per_actor,
                num_gpus=res.gpus_per_actor,
                max_restarts=-1,
                max_task_retries=0,
                scheduling_strategy="SPREAD",
                # Unique per run: two runs on one cluster may share a run-dir name.
                name=f"{self.run_dir.name}-{run_tag}/client-{i}",
                namespace="simfl",
            ).remote(scenario, i, np.flatnonzero(self.owner == i).tolist())
            for i in range(n_actors)
        ]
        self.refs = refs
        self.incarnation = [0] * n_actors
        self.home_fresh = np.ones(self.partition.num_clients, dtype=bool)
        self.actor_info = ray.get([self._attach(i) for i in range(n_actors)])

        # Attack results stream in between rounds (see AttackLog).
        self.attack_pool = None
        if self.sc.attacks is not None:
            self.attack_log = AttackLog(
                self.run_dir, self.tables, lambda c: self.pop_names[pop[c]],
                resumed_round=self.round if resume else None, rerun_rounds={job["round"] for job in restored_jobs},
            )
            knowledge = AttackerKnowledge.from_dataset(dataset, ray.get(refs["evaluator"]))
            self.attack_pool = AttackPool.start(scenario, knowledge, f"{self.run_dir.name}-{run_tag}", self.attack_log.done)
            # In flight at the checkpoint we resume from: run them again (waiting for room, never dropped).
            for job in self.attack_log.expect(restored_jobs):
                job["victims"] = [victim_from_state(v) for v in job["victims"]]
                while not self._submit_attack(job):
                    self.attack_pool.wait_for_one()

    # ------------------------------------------------------------ setup

    def _test_sets(self, dataset: Dataset) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        sets = {"global": (torch.from_numpy(np.array(dataset.test_x)), torch.from_numpy(dataset.test_y.astype(np.int64)))}
        for i, p in enumerate(self.sc.populations):
            sets[p.name] = population_test_set(dataset, p.shift, self.sc.seed, i)
        return sets

    def _restore(self) -> tuple[int, list[dict]]:
        state = load_latest(self.run_dir)
        if state is None:
            raise RuntimeError(f"{self.run_dir} has no checkpoint to resume from")
        self.round = int(state["round"])
        self.weights = state["weights"]
        self.server.load_state_dict(state["server"])
        self.journal = {int(c): dict(s) for c, s in state["journal"].items()}
        self.defence.load_server_state(state.get("defence", {}))
        self.tables.truncate_to(state["manifest"])
        return self.round + 1, state.get("attack_jobs", [])

    def _attach(self, shard: int):
        """Give a (new or restarted) client actor its data and the journaled state of all its clients."""
        self.incarnation[shard] += 1
        home = np.flatnonzero(self.owner == shard)
        self.home_fresh[home] = True
        states = {int(c): self.journal.get(int(c), new_client_state()) for c in home}
        return self.actors[shard].attach.remote(self.refs, states)

    def _reattach(self, shard: int) -> None:
        """Re-attach an actor whose call was lost; waits for Ray to restart it if needed."""
        for _ in range(MAX_RERUNS_PER_ROUND):
            try:
                ray.get(self._attach(shard))
                return
            except RayActorError:
                continue
        raise RuntimeError(f"client actor {shard} could not be restarted and re-attached")

    def info(self) -> dict:
        """Where the run stands (the round to resume from) and where its actors run."""
        return {"round": self.round, "actors": self.actor_info, "clients": int(self.partition.num_clients)}

    def global_weights(self) -> torch.Tensor:
        """The current global weights (benchmarks replay rounds from them)."""
        return self.weights.clone()

    # ------------------------------------------------------------ one round

    def _dispatch(
        self, method: str, key: int, weights_ref, clients: np.ndarray, probe: bool = False
    ) -> tuple[list[dict], int]:
        """Run ``method`` for ``clients`` over the actors; re-run the work of any actor that dies.

        Work goes out in chunks (see :class:`RoundSchedule`), two calls deep per actor
        so that none idles waiting for the next. A chunk of a dead actor goes back to
        the queue; Ray restarts the actor and it is re-attached before its next call.
        Returns the result rows sorted by client id, and how many chunks were re-run.
        ``probe`` (``train`` only): the clients are probed attack victims, not trained
        for the round; their states are neither changed nor journaled.
        """
        schedule = RoundSchedule(clients, self.owner, self.partition.sizes, len(self.actors))
        in_flight: dict = {}
        attempts: dict[int, int] = {}
        reruns = 0

        def submit(shard: int) -> None:
            chunk = schedule.next_for(shard)
            if chunk is None:
                return
            call = getattr(self.actors[shard], method)
            if method == "train":
                victims = list(chunk) if probe else [c for c in chunk if c in self.round_victims]
                ref = call.remote(key, weights_ref, chunk, self._states_to_send(shard, chunk), victims,
                                  self.broadcast_ref, probe=probe)
            else:
                ref = call.remote(key, weights_ref, chunk)
            in_flight[ref] = (shard, chunk, self.incarnation[shard])

        for _ in range(2):
            for shard in range(len(self.actors)):
                submit(shard)
        rows: list[dict] = []
        waited = 0
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_REPORT_S)
            if not ready:
                waited += WAIT_REPORT_S
                busy = sorted({shard for shard, _, _ in in_flight.values()})
                print(f"simfl: {method} round {key}: client actors {busy} have not answered for {waited} s "
                      "(lost node, or no resources to restart an actor?)", file=sys.stderr)
                continue
            waited = 0
            (ref,) = ready
            shard, chunk, incarnation = in_flight.pop(ref)
            try:
                out = ray.get(ref)
            except (RayActorError, ShardNotAttached):
                # Died mid-call (RayActorError) or between calls (restarted, empty).
                reruns += 1
                if reruns > MAX_RERUNS_PER_ROUND * len(self.actors):
                    raise
                for c in chunk:
                    attempts[c] = attempts.get(c, 1) + 1
                schedule.give_back(chunk)
                if incarnation == self.incarnation[shard]:  # not yet re-attached since this call went out
                    self._reattach(shard)
                submit(shard)
                continue
            for row in out:
                c = row["client_id"]
                row["attempt"] = attempts.get(c, 1)
                if method == "train" and not probe:
                    self.journal[c] = row["state"]
                    # The home actor's copy is current only if it trained the client itself,
                    # in its present incarnation.
                    self.home_fresh[c] = self.owner[c] == shard and incarnation == self.incarnation[shard]
            rows.extend(out)
            submit(shard)
        rows.sort(key=lambda r: r["client_id"])
        return rows, reruns

    def _states_to_send(self, shard: int, chunk: list[int]) -> dict[int, dict[str, int]]:
        """Client states the actor lacks: clients it does not own, or whose home copy is stale."""
        return {
            c: self.journal.get(c, new_client_state())
            for c in chunk
            if self.owner[c] != shard or not self.home_fresh[c]
        }

    def run_round(self) -> dict | None:
        """Train one round; returns a summary for the progress bar, or None when the run is complete."""
        if self.round >= self.sc.training.rounds:
            return None
        started = time.perf_counter()
        r = self.round + 1
        cohort = sample_cohort(self.sc, self.train_clients, r)
        self.round_victims = sample_victims(self.sc, cohort, r)
        weights_ref = ray.put(self.weights.numpy())
        broadcast = self.defence.broadcast()
        self.broadcast_ref = ray.put(broadcast)
        results, reruns = self._dispatch("train", r, weights_ref, cohort)
        victims = [res.pop("victim") for res in results if res["victim"] is not None]
        # Held-out clients probed as if they had joined: attacked only (not aggregated, not logged as clients).
        probes = sample_held_out_victims(self.sc, self.held_out_clients, r)
        if len(probes):
            probed, probe_reruns = self._dispatch("train", r, weights_ref, probes, probe=True)
            victims += [res["victim"] for res in probed]
            reruns += probe_reruns
        dropped = self._attack(r, victims, broadcast)

        deltas = [torch.tensor(res["delta"]) for res in results]  # copies out of the read-only object store
        samples = [res["samples"] for res in results]
        mean_delta = weighted_mean(deltas, samples)
        new_weights = self.server.step(self.weights, mean_delta)
        global_norm = float((new_weights - self.weights).norm())
        self.weights = new_weights

        pop = self.partition.client_population
        client_rows = [
            {
                "round": r,
                "client_id": res["client_id"],
                "population": self.pop_names[pop[res["client_id"]]],
                "samples": res["samples"],
                "steps": res["steps"],
                "loss": res["loss"],
                "accuracy": res["accuracy"],
                "update_norm": float(np.linalg.norm(res["delta"])),
                "time_s": res["time_s"],
                "actor": res["actor"],
                "node_id": res["node_id"],
                "attempt": res["attempt"],
                "participation": res["state"]["participation"],
                **res["defence"],
            }
            for res in results
        ]
        total = sum(samples)
        train_loss = sum(row["loss"] * row["samples"] for row in client_rows) / total
        train_acc = sum(row["accuracy"] * row["samples"] for row in client_rows) / total
        summary: dict = {"round": r, "train_loss": train_loss, "train_accuracy": train_acc}
        self.tables.append("clients", client_rows)
        self.tb.add_scalar("train/loss", train_loss, r)
        self.tb.add_scalar("train/accuracy", train_acc, r)
        self.flat.load(self.weights)
        defence_figures = self._defence_figures(r, client_rows)

        if r % self.sc.evaluation.every == 0 or r == self.sc.training.rounds:
            summary.update(self._evaluate(r))

        round_time = time.perf_counter() - started
        self.tables.append(
            "rounds",
            [
                {
                    "round": r,
                    "clients": len(results),
                    "samples": total,
                    "train_loss": train_loss,
                    "train_accuracy": train_acc,
                    "update_norm_mean": float(np.mean([row["update_norm"] for row in client_rows])),
                    "global_update_norm": global_norm,
                    "reruns": reruns,
                    "attack_victims": len(victims),
                    "attack_victims_dropped": dropped,
                    "round_time_s": round_time,
                    "finished_at": time.time(),
                    **defence_figures,
                }
            ],
        )
        self.tb.add_scalar("time/round_s", round_time, r)
        self.round = r
        every = self.sc.checkpoint.every
        if (every and r % every == 0) or r == self.sc.training.rounds:
            self._checkpoint()
        else:
            self.tables.maybe_flush()
        summary["round_time_s"] = round_time
        return summary

    # ------------------------------------------------------------ defence

    def _defence_figures(self, r: int, client_rows: list[dict]) -> dict[str, float]:
        """The defence's server step, and its state and knobs for this round (rounds table, TensorBoard).

        Per-client figures are averaged over the cohort; ε also gets its maximum,
        the privacy of the least protected client so far this round.
        """
        figures = self.defence.server_round(r, self.model, client_rows)
        for name in CLIENT_DEFENCE_COLUMNS:
            values = [row[name] for row in client_rows if row.get(name) is not None]
            if values:
                figures[name] = float(np.mean(values))
                if name == "dp_epsilon":
                    figures["dp_epsilon_max"] = float(np.max(values))
        knobs = self.sc.defence.knobs()
        for name, value in figures.items():
            self.tb.add_scalar(f"defence/{name}", value, r)
        for name, value in knobs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"defence/knob/{name}", value, r)
        return {**figures, "defence": self.sc.defence.kind, "defence_knobs": json.dumps(knobs, sort_keys=True)}

    # ------------------------------------------------------------ attacks

    def _attack(self, r: int, victims: list[Victim], context: dict) -> int:
        """Hand this round's victims, with the defence broadcast they trained under, to the attacker pool.

        Returns how many were dropped.
        """
        if self.attack_pool is None:
            return 0
        # One tensor for the round's global weights: Ray and checkpoints then carry it once per job, not per victim.
        victims = [
            replace(v, observation=replace(v.observation, weights=self.weights))
            if torch.equal(v.observation.weights, self.weights) else v
            for v in victims
        ]
        jobs = [{"round": r, "victims": group, "context": context}
                for group in attack_jobs(victims, self.sc.attacks.victims_per_job)]
        dropped = 0
        for job in self.attack_log.expect(jobs):
            if not self._submit_attack(job):
                dropped += len(job["victims"])
                self.attack_log.settle(r)
        if dropped:
            print(f"simfl: round {r}: attack pool full, {dropped} victims not attacked "
                  "(attacks.pool.when_full: drop; counted in rounds.attack_victims_dropped)", file=sys.stderr)
        self.attack_pool.collect(timeout=0)
        return dropped

    def _submit_attack(self, job: dict) -> bool:
        job["submitted_at"] = time.time()
        return self.attack_pool.submit(job)

    # ------------------------------------------------------------ evaluation

    def _evaluate(self, r: int) -> dict:
        self.flat.load(self.weights)
        rows = []
        out: dict = {}
        for name, (x, y) in self.test_sets.items():
            loss_sum, correct, n = evaluate(self.model, x, y, self.sc.evaluation.batch_size)
            held = name != "global" and bool(self.held_out[self.pop_names.index(name)])
            rows.append(
                {"round": r, "population": name, "held_out": held, "scope": "test", "clients": None,
                 "samples": n, "loss": loss_sum / n, "accuracy": correct / n}
            )
            self.tb.add_scalar(f"test_accuracy/{name}", correct / n, r)
            self.tb.add_scalar(f"test_loss/{name}", loss_sum / n, r)
        out["test_accuracy"] = rows[0]["accuracy"]

        n_clients = self.partition.num_clients
        k = n_clients if self.sc.evaluation.local_clients == "all" else min(self.sc.evaluation.local_clients, n_clients)
        if self.sc.evaluation.local_val_fraction > 0:
            chosen = np.sort(rng(self.sc.seed, "local-eval", r).choice(n_clients, size=k, replace=False))
            local, _ = self._dispatch("evaluate", r, ray.put(self.weights.numpy()), chosen)
            rows.extend(self._local_rows(r, local))
        self.tables.append("evals", rows)
        return out

    def _local_rows(self, r: int, local: list[dict]) -> list[dict]:
        pop = self.partition.client_population
        self.tables.append(
            "client_evals",
            [
                {"round": r, "client_id": row["client_id"], "population": self.pop_names[pop[row["client_id"]]],
                 "samples": row["samples"], "loss": row["loss_sum"] / row["samples"],
                 "accuracy": row["correct"] / row["samples"]}
                for row in local
            ],
        )
        rows = []
        for p, name in enumerate(self.pop_names):
            mine = [row for row in local if pop[row["client_id"]] == p]
            if not mine:
                continue
            n = sum(row["samples"] for row in mine)
            acc = sum(row["correct"] for row in mine) / n
            rows.append(
                {"round": r, "population": name, "held_out": bool(self.held_out[p]), "scope": "local_val",
                 "clients": len(mine), "samples": n, "loss": sum(row["loss_sum"] for row in mine) / n, "accuracy": acc}
            )
            self.tb.add_scalar(f"local_val_accuracy/{name}", acc, r)
        return rows

    # ------------------------------------------------------------ persistence

    def _checkpoint(self) -> None:
        self.tables.flush()
        self.tb.flush()
        if self.attack_pool is not None:
            self.attack_log.flush()
        save_checkpoint(
            self.run_dir,
            self.round,
            {
                "weights": self.weights,
                "server": self.server.state_dict(),
                "journal": self.journal,
                "manifest": self.tables.manifest(),
                # Attacks still running: their results are not in the manifest, so a resume re-runs them.
                "defence": self.defence.server_state(),
                "attack_jobs": [
                    {"round": job["round"], "victims": [victim_state(v) for v in job["victims"]],
                     "context": job.get("context")}
                    for job in (self.attack_pool.jobs() if self.attack_pool else [])
                ],
            },
            keep=self.sc.checkpoint.keep,
        )

    def finish(self) -> dict:
        """Wait for pending attacks, flush everything, save the final model and stop the actors."""
        if self.attack_pool is not None:
            self.attack_pool.drain()
            self.attack_pool.stop()
            self.attack_log.close()
        self.tables.flush()
        self.tb.close()
        # Its presence marks the run finished (a study or arms resume skips it): write it whole or not at all.
        tmp = self.run_dir / ".final_weights.pt.tmp"
        torch.save({"weights": self.weights}, tmp)
        os.replace(tmp, self.run_dir / "final_weights.pt")
        for actor in self.actors:
            ray.kill(actor)
        return {"round": self.round}
