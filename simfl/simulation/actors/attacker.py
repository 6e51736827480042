"""Attacker actors, and the pool the coordinator feeds them through without waiting on them.

An attack job is one round's victims of one shape (see ``Victim.group``), up
to ``attacks.victims_per_job`` of them, reconstructed by every configured
attack in one batched optimisation each. Jobs run while training goes on;
the coordinator collects finished ones between rounds. The pool bounds how
many jobs are pending: when full it either waits (training pauses) or drops
the job, and every dropped victim is counted in the rounds table.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from simfl.core.config import AttackPoolConfig
from simfl.core.determinism import actor_runtime_env, pin_cpu_kernels
from simfl.core.resources import actor_device, torch_threads, within_gpu_share
from simfl.core.seeding import derive_seed, torch_generator
from simfl.core.training import to_input
from simfl.core.weights import FlatWeights
from simfl.data import Dataset
from simfl.data.acquisition import Devices, apply_shift, draw_devices
from simfl.engine.attack_log import attack_label
from simfl.engine.scenario import Scenario
from simfl.engine.victim import Victim
from simfl.privacy.attacks import Attack, adapt, build_attack
from simfl.privacy.attacks.base import AuxData
from simfl.privacy.defences import defended_model
from simfl.privacy.evaluator import Evaluator
from simfl.privacy.metrics import score_baselines, score_batch
from simfl.simulation.actors.restarts import once_restarted

# Images per attack shown in a TensorBoard grid / PNG (originals above, reconstructions below).
GRID_IMAGES = 16
# How long a wait for attack results goes on before saying so (it keeps waiting).
WAIT_REPORT_S = 60
# Times one job is re-sent after its attacker actor died before the run fails.
MAX_JOB_RETRIES = 2
# Server images a learned attack trains on (the validation split's first ones): bounds memory at large sizes.
AUX_IMAGES = 2000
# Validation images per label in the instance-identification pool (the nn_* columns), at most.
NN_PEERS = 256


@dataclass(frozen=True)
class AttackerKnowledge:
    """What every attacker holds besides the scenario: all of it from data disjoint from the clients'."""

    shape: tuple[int, int, int]  # channels, image size, classes
    mean_image: torch.Tensor  # (C, H, W): the mean-image baseline, over the validation split
    class_means: torch.Tensor  # (K, C, H, W): each class's mean over the validation split (the global mean if absent)
    evaluator: Evaluator
    aux: AuxData  # the server's own images (the validation split, at most AUX_IMAGES): what learned attacks train on
    # Scoring only, never given to an attack: the first NN_PEERS validation images of each label, the
    # candidates a reconstruction's own original must stand out from (see ``peer_pool``).
    peers: AuxData

    @classmethod
    def from_dataset(cls, dataset: Dataset, evaluator: Evaluator, seed: int) -> AttackerKnowledge:
        """What an attacker holds of ``dataset``: image shape, class count, the validation split and its mean image."""
        # uint8 summed in float64 by numpy: no float copy of the whole split (GBs at 224 px).
        mean = torch.from_numpy(dataset.val_x.mean(axis=0, dtype=np.float64) / 255.0).permute(2, 0, 1).float()
        labels = np.asarray(dataset.val_y).reshape(-1)
        class_means = mean.unsqueeze(0).repeat(dataset.num_classes, 1, 1, 1)
        for k in np.unique(labels):
            images = dataset.val_x[labels == k]
            class_means[int(k)] = torch.from_numpy(images.mean(axis=0, dtype=np.float64) / 255.0).permute(2, 0, 1)
        aux = AuxData(torch.from_numpy(np.array(dataset.val_x[:AUX_IMAGES])),
                      torch.from_numpy(np.array(dataset.val_y[:AUX_IMAGES], dtype=np.int64)), seed)
        # Stable sort by label, then the first NN_PEERS of each: in validation-split order within a label.
        order = np.argsort(labels, kind="stable")
        rank = np.arange(len(order)) - np.searchsorted(labels[order], labels[order])
        pick = np.sort(order[rank < NN_PEERS])
        peers = AuxData(torch.from_numpy(np.array(dataset.val_x[pick])),
                        torch.from_numpy(labels[pick].astype(np.int64)), seed)
        return cls((dataset.channels, dataset.image_size, dataset.num_classes), mean, class_means, evaluator, aux,
                   peers)


def client_device_view(images: np.ndarray, sc: Scenario, client: int, channels: int) -> np.ndarray:
    """``images`` (n, H, W, C) uint8 as client ``client``'s acquisition device shows them.

    The device is the client's own, drawn exactly as ``simfl.data.client_data.client_data``
    draws it (its population's shift, from (seed, client)); the pixel noise is a
    fresh draw of the same strength, as for any other image that device takes.
    """
    counts = [p.clients for p in sc.populations]
    if not 0 <= client < sum(counts):
        raise ValueError(f"client {client} is not one of the scenario's {sum(counts)} clients")
    # Client ids are 0..N-1 in population order (simfl.data.partition.make_partition).
    shift = sc.populations[int(np.searchsorted(np.cumsum(counts), client, side="right"))].shift
    if shift.is_identity:
        return images
    device = draw_devices(shift, sc.seed, "client-device", np.array([client]), channels)
    n = len(images)
    per_image = Devices(gain=np.repeat(device.gain, n, axis=0), brightness=np.repeat(device.brightness, n),
                        contrast=np.repeat(device.contrast, n))
    return apply_shift(images, shift, per_image, derive_seed(sc.seed, "nn-peer-noise", client))


def peer_pool(peers: AuxData, sc: Scenario, victim: Victim, channels: int) -> torch.Tensor:
    """The candidates a victim's originals must stand out from to count as identified (``nn_match``).

    The server's validation images (``peers``: disjoint from every client's) with
    a label in the victim's batch, seen through the victim's own acquisition
    device (:func:`client_device_view`): the victim's images among same-class
    peers taken by the same scanner, so only what is particular to the instance
    tells them apart, not its class and not its device's look. (N, C, H, W) in [0, 1].
    """
    keep = torch.isin(peers.labels, victim.labels.unique())
    images = peers.images[keep].numpy()  # a copy (boolean indexing), so writable whether or not a shift applies
    return to_input(torch.from_numpy(client_device_view(images, sc, victim.client_id, channels)))


@ray.remote
class Attacker:
    """An attacker actor: runs every configured attack on a round's victims and scores the reconstructions."""

    def __init__(self, scenario: dict, index: int) -> None:
        # Built from small by-value arguments, so Ray can restart it alone: a constructor argument held in the
        # object store (its knowledge, megabytes) could be gone by then (ray#53727). The knowledge comes with
        # each job instead, as a reference the pool keeps alive, and is taken in on the first job after a start.
        self.sc = Scenario.model_validate(scenario)
        attacks = self.sc.attacks
        assert attacks is not None  # attacker actors exist only for scenarios that attack
        self.attacks = attacks
        pin_cpu_kernels(torch_threads(attacks.pool.cpus_per_actor))
        self.device = actor_device(attacks.pool.gpus_per_actor)
        self.index = index
        self.known: ray.ObjectRef | None = None

    def _learn(self, ref: ray.ObjectRef) -> None:
        """Take in the attacker's knowledge (a reference to :class:`AttackerKnowledge`) unless already held."""
        if self.known == ref:
            return
        knowledge: AttackerKnowledge = ray.get(ref)
        self.evaluator = knowledge.evaluator
        self.mean_image = knowledge.mean_image
        self.class_means = knowledge.class_means
        self.peers = knowledge.peers
        self.channels = knowledge.shape[0]
        # The defended model (the shared weights' layout) and the defence, to learn what it discloses.
        model, self.defence = defended_model(self.sc.model, self.sc.defence, self.sc.seed, knowledge.shape)
        self.model = model.to(self.device)
        self.flat = FlatWeights(self.model)
        self.classifier = self.evaluator.model(*knowledge.shape, self.device)
        self.methods = {m.kind: build_attack(m, knowledge.aux) for m in self.attacks.methods}
        self.known = ref

    def _attacks(self, context: dict | None) -> dict[tuple[str, str], Attack]:
        """Every attack naive; and adaptive too when the defence discloses anything (given the round's broadcast).

        The attacker's own copy of the defence takes the round's broadcast first, as a
        client does, so that it can compute what a victim shares. An attack that does
        not apply (e.g. the server decoder without a defence that trains one) is left out.
        """
        if context:
            self.defence.receive(context, self.device)
        naive, adaptive = self.defence.naive_view(), self.defence.disclosure(context)
        attacks: dict[tuple[str, str], Attack] = {}
        for kind, attack in self.methods.items():
            told = {"naive": adapt(attack, naive)}
            if adaptive is not None:
                told["adaptive"] = adapt(attack, adaptive)
            attacks.update({(kind, know): a for know, a in told.items() if a.applies()})
        return attacks

    def attack(self, victims: list[Victim], context: dict | None, knowledge: list[ray.ObjectRef]) -> dict:
        """Run every configured attack on the stacked victims (all of one round); one row per reconstructed image.

        ``context``: the defence's broadcast of the victims' round, which an adaptive attacker uses.
        ``knowledge``: ``[ref]`` to the :class:`AttackerKnowledge` (in a list, so Ray hands over the reference
        and the actor fetches it once, not a fresh copy with every job).
        """
        self._learn(knowledge[0])
        with within_gpu_share("attacks.pool.gpus_per_actor", self.attacks.pool.gpus_per_actor,
                              f"attacker {self.index}"):
            return self._attack(victims, context)

    def _attack(self, victims: list[Victim], context: dict | None) -> dict:
        seeds = [derive_seed(self.sc.seed, "attack", v.client_id, v.round) for v in victims]
        observations = [v.observation for v in victims]
        rows: list[dict] = []
        grids: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        pools = [peer_pool(self.peers, self.sc, v, self.channels) for v in victims]  # the same for every attack
        # The image-free guesses do not depend on the attack: scored once per victim, shared by every attack.
        baselines = [score_baselines(v.images, v.labels, self.classifier, self.mean_image,
                                     torch_generator(self.sc.seed, "attack-baseline", v.client_id, v.round),
                                     self.class_means, peers=pools[i]) for i, v in enumerate(victims)]
        for (kind, knowledge), attack in self._attacks(context).items():
            result = attack(self.model, self.flat, observations, seeds)
            finished = time.time()
            # Convergence check: the objective at the true images beside its value at the found ones.
            truth = torch.stack([v.images for v in victims])
            at_truth = attack.objective_at(self.model, self.flat, observations, truth)
            shown_orig, shown_recon = [], []
            for i, v in enumerate(victims):
                # In the box the data live in; a non-finite pixel (an attack that found nothing) scores as black.
                recon = torch.nan_to_num(result.images[i].detach().cpu(), nan=0.0).clamp(0.0, 1.0)
                orig = v.images
                scored: list[dict[str, Any]] = score_batch(recon, orig, v.labels, result.labels[i].cpu(),
                                                           self.classifier, baselines=baselines[i])
                for row in scored:
                    row.update(
                        round=v.round, client_id=v.client_id, attack=kind, knowledge=knowledge,
                        defence=self.sc.defence.kind, view=v.observation.view,
                        labels=self.attacks.labels, batch_size=v.observation.batch_size,
                        iterations=int(result.iterations[i]), objective=float(result.objective[i]),
                        objective_at_truth=float(at_truth[i]),
                        evaluator_test_accuracy=self.evaluator.test_accuracy, evaluator_arch=self.evaluator.arch,
                        victims_in_job=len(victims),
                        attacker=self.index, attack_s=result.seconds, finished_at=finished,
                    )
                rows.extend(scored)
                shown_orig.append(orig[[row["matched_image"] for row in scored]])
                shown_recon.append(recon)
            grids[attack_label(kind, knowledge)] = (torch.cat(shown_orig)[:GRID_IMAGES],
                                                    torch.cat(shown_recon)[:GRID_IMAGES])
        return {"rows": rows, "grids": grids}


class AttackPool:
    """The attacker actors as seen from the coordinator: submit without waiting, collect when done."""

    def __init__(self, pool: AttackPoolConfig, actors: list, knowledge: ray.ObjectRef,
                 on_done: Callable[[dict, dict], None]) -> None:
        self.cfg = pool
        self.actors = actors
        self.knowledge = knowledge  # held here for the pool's life: every job (and restarted actor) reads it
        self.on_done = on_done
        self.pending: dict[ray.ObjectRef, tuple[int, dict]] = {}  # ref -> (actor, job)

    @classmethod
    def start(
        cls, scenario: dict, knowledge: AttackerKnowledge, run_tag: str, on_done: Callable[[dict, dict], None]
    ) -> AttackPool:
        """Start the scenario's attacker actors (named ``<run_tag>/attacker-<i>``)."""
        attacks = Scenario.model_validate(scenario).attacks
        assert attacks is not None  # a pool starts only for scenarios that attack
        pool = attacks.pool
        actors = [
            Attacker.options(  # type: ignore[attr-defined]  # Ray's decorator adds .options
                num_cpus=pool.cpus_per_actor,
                num_gpus=pool.gpus_per_actor,
                max_restarts=-1,
                max_task_retries=0,
                name=f"{run_tag}/attacker-{i}",
                namespace="simfl",
                runtime_env=actor_runtime_env(),
            ).remote(scenario, i)
            for i in range(pool.actors)
        ]
        return cls(pool, actors, ray.put(knowledge), on_done)

    def _send(self, actor: int, job: dict) -> None:
        """Hand ``job`` to attacker ``actor`` (its knowledge by reference) and count it pending."""
        ref = self.actors[actor].attack.remote(job["victims"], job.get("context"), [self.knowledge])
        self.pending[ref] = (actor, job)

    def submit(self, job: dict) -> bool:
        """Queue one job; False if it was dropped because the pool is full (``when_full: drop``)."""
        self.collect(timeout=0)  # finished jobs free their places before fullness is judged
        while len(self.pending) >= self.cfg.max_pending:
            if self.cfg.when_full == "drop":
                return False
            self.wait_for_one()
        load = [0] * len(self.actors)
        for actor, _ in self.pending.values():
            load[actor] += 1
        self._send(int(np.argmin(load)), job)
        return True

    def collect(self, timeout: float = 0) -> int:
        """Hand finished jobs to ``on_done``, waiting up to ``timeout`` s for one; returns how many were handed on.

        A job whose attacker died is re-sent and does not count.
        """
        if not self.pending:
            return 0
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
        handed = 0
        for ref in ready:
            actor, job = self.pending.pop(ref)
            try:
                out = ray.get(ref)
            except RayActorError:
                job["retries"] = job.get("retries", 0) + 1
                if job["retries"] > MAX_JOB_RETRIES:
                    raise
                print(f"simfl: attacker {actor} died; re-sending its job of round {job['round']}", file=sys.stderr)
                once_restarted(self.actors[actor].__ray_ready__.remote, f"attacker actor {actor}")
                self._send(actor, job)
                continue
            self.on_done(job, out)
            handed += 1
        return handed

    def wait_for_one(self) -> None:
        """Block until at least one pending job is collected, saying so while it takes long."""
        since = last_report = time.monotonic()
        while self.pending and not self.collect(timeout=WAIT_REPORT_S):
            if time.monotonic() - last_report >= WAIT_REPORT_S:  # not after a re-sent job: that returns at once
                last_report = time.monotonic()
                print(f"simfl: {len(self.pending)} attack jobs pending, none finished in "
                      f"{last_report - since:.0f} s (no resources to place an attacker actor?)", file=sys.stderr)

    def drain(self) -> None:
        """Wait for every pending job: none is lost at the end of a run."""
        if self.pending:
            print(f"simfl: waiting for {len(self.pending)} pending attack jobs", file=sys.stderr)
        while self.pending:
            self.wait_for_one()

    def jobs(self) -> list[dict]:
        """Pending jobs, oldest first (a checkpoint keeps them so a resumed run re-runs them)."""
        return sorted((job for _, job in self.pending.values()), key=lambda j: j["submitted_at"])

    def stop(self) -> None:
        """Kill the attacker actors; jobs still pending are abandoned."""
        for actor in self.actors:
            ray.kill(actor)
