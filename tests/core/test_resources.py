import numpy as np
import pytest
import torch

from simfl.core.config import ResourcesConfig
from simfl.core.errors import UserError
from simfl.core.resources import (
    GpuShareExceeded,
    actor_device,
    assign_clients,
    gpu_memory_fraction,
    plan_actors,
    torch_threads,
    within_gpu_share,
)


def res(**kw):
    return ResourcesConfig(**kw)


# ---------------------------------------------------------------- plan_actors


def test_explicit_count_capped_by_clients():
    assert plan_actors(res(client_actors=4), cluster_cpus=4, cluster_gpus=0, num_clients=10) == 4
    assert plan_actors(res(client_actors=16), cluster_cpus=64, cluster_gpus=0, num_clients=10) == 10
    assert plan_actors(res(client_actors=1), cluster_cpus=1, cluster_gpus=0, num_clients=1) == 1


def test_auto_from_cpus():
    assert plan_actors(res(), cluster_cpus=8, cluster_gpus=0, num_clients=100) == 8
    assert plan_actors(res(cpus_per_actor=2), cluster_cpus=8, cluster_gpus=0, num_clients=100) == 4
    assert plan_actors(res(cpus_per_actor=3), cluster_cpus=8, cluster_gpus=0, num_clients=100) == 2
    assert plan_actors(res(cpus_per_actor=0.5), cluster_cpus=3, cluster_gpus=0, num_clients=100) == 6


def test_auto_subtracts_coordinator_cpus():
    assert plan_actors(res(coordinator_cpus=1), cluster_cpus=8, cluster_gpus=0, num_clients=100) == 7
    assert plan_actors(res(coordinator_cpus=1, cpus_per_actor=2), cluster_cpus=8, cluster_gpus=0, num_clients=100) == 3
    assert plan_actors(res(coordinator_cpus=0.5, cpus_per_actor=0.5), cluster_cpus=4, cluster_gpus=0,
                       num_clients=100) == 7


def test_auto_capped_by_clients():
    assert plan_actors(res(), cluster_cpus=64, cluster_gpus=0, num_clients=5) == 5


def test_auto_tolerates_float_rounding():
    # 3.0 / 0.1 == 29.999999999999996 in floating point
    assert plan_actors(res(cpus_per_actor=0.1), cluster_cpus=3.0, cluster_gpus=0, num_clients=100) == 30
    assert plan_actors(res(cpus_per_actor=0.3, coordinator_cpus=0.3), cluster_cpus=0.9, cluster_gpus=0,
                       num_clients=9) == 2


def test_auto_gpu_bound():
    cfg = res(gpus_per_actor=0.5)
    assert plan_actors(cfg, cluster_cpus=16, cluster_gpus=2, num_clients=100) == 4
    # CPUs bind when they are scarcer
    assert plan_actors(cfg, cluster_cpus=3, cluster_gpus=2, num_clients=100) == 3
    assert plan_actors(res(gpus_per_actor=1), cluster_cpus=16, cluster_gpus=1, num_clients=100) == 1
    # 1 / (1/3) rounds to 2.9999999999999996
    assert plan_actors(res(gpus_per_actor=1 / 3), cluster_cpus=16, cluster_gpus=1, num_clients=100) == 3


def test_gpus_requested_on_gpu_less_cluster():
    for cfg in (res(gpus_per_actor=0.5), res(gpus_per_actor=1, client_actors=2)):
        with pytest.raises(UserError) as info:
            plan_actors(cfg, cluster_cpus=8, cluster_gpus=0, num_clients=10)
        msg = str(info.value)
        assert "resources.gpus_per_actor" in msg and "\n" not in msg


def test_gpus_per_actor_above_cluster_gpus():
    with pytest.raises(UserError) as info:
        plan_actors(res(gpus_per_actor=2), cluster_cpus=8, cluster_gpus=1, num_clients=10)
    assert "resources.gpus_per_actor" in str(info.value)


def test_too_many_cpus_per_actor():
    with pytest.raises(UserError) as info:
        plan_actors(res(cpus_per_actor=8), cluster_cpus=4, cluster_gpus=0, num_clients=10)
    msg = str(info.value)
    assert "resources.cpus_per_actor" in msg and "8" in msg and "4" in msg and "\n" not in msg
    # the coordinator's reservation counts too
    with pytest.raises(UserError, match="resources.cpus_per_actor"):
        plan_actors(res(cpus_per_actor=2, coordinator_cpus=3), cluster_cpus=4, cluster_gpus=0, num_clients=10)


def test_explicit_count_must_fit_a_fixed_cluster():
    # On the private local instance nothing will ever add CPUs: Ray would wait forever.
    with pytest.raises(UserError, match="resources.client_actors") as info:
        plan_actors(res(client_actors=4), cluster_cpus=2, cluster_gpus=0, num_clients=10)
    assert "\n" not in str(info.value)
    assert plan_actors(res(client_actors=4, cpus_per_actor=0.5), cluster_cpus=2, cluster_gpus=0, num_clients=10) == 4
    with pytest.raises(UserError, match="resources.gpus_per_actor"):
        plan_actors(res(client_actors=3, gpus_per_actor=0.5), cluster_cpus=8, cluster_gpus=1, num_clients=10)


def test_elastic_cluster_trusts_explicit_counts():
    # Joined with --address, an autoscaler may add the nodes the actors ask for.
    assert plan_actors(res(client_actors=4), cluster_cpus=2, cluster_gpus=0, num_clients=10, elastic=True) == 4
    cfg = res(client_actors=2, gpus_per_actor=1)
    assert plan_actors(cfg, cluster_cpus=4, cluster_gpus=0, num_clients=10, elastic=True) == 2
    with pytest.raises(UserError, match="client_actors to a number"):
        plan_actors(res(gpus_per_actor=1), cluster_cpus=4, cluster_gpus=0, num_clients=10, elastic=True)


def test_zero_cpu_cluster_rejected():
    with pytest.raises(UserError):
        plan_actors(res(), cluster_cpus=0, cluster_gpus=0, num_clients=10)


# ---------------------------------------------------------------- assign_clients


def check_assignment(sizes, n_actors):
    owner = assign_clients(sizes, n_actors)
    assert owner.shape == sizes.shape
    assert owner.dtype == np.int64
    assert owner.min(initial=0) >= 0
    if len(sizes):
        assert owner.max() < n_actors
    totals = np.bincount(owner, weights=sizes, minlength=n_actors)
    assert totals.sum() == sizes.sum()
    if len(sizes):
        assert totals.max() - totals.min() <= sizes.max()
    counts = np.bincount(owner, minlength=n_actors)
    assert counts.max() - counts.min() <= 1  # clients dealt one per actor per lap
    return owner


@pytest.mark.parametrize("n_actors", [1, 2, 3, 7, 16])
def test_assign_balanced_random_sizes(n_actors):
    g = np.random.default_rng(n_actors)
    for _ in range(20):
        n = int(g.integers(1, 200))
        sizes = np.maximum(1, g.lognormal(3.5, 1.0, n).astype(np.int64))
        check_assignment(sizes, n_actors)


def test_assign_adversarial_sizes():
    check_assignment(np.array([1000, 1, 1, 1, 1, 1, 1]), 3)
    check_assignment(np.array([5] * 10), 3)
    check_assignment(np.arange(1, 101), 4)
    check_assignment(np.array([7]), 4)  # more actors than clients


def test_assign_snake_order():
    sizes = np.array([10, 60, 30, 50, 20, 40])  # sorted: 60,50,40,30,20,10
    owner = assign_clients(sizes, 3)
    # lap 0 deals 60,50,40 to actors 0,1,2; lap 1 deals 30,20,10 to actors 2,1,0
    assert owner.tolist() == [0, 0, 2, 1, 1, 2]
    assert np.bincount(owner, weights=sizes).tolist() == [70.0, 70.0, 70.0]


def test_assign_deterministic_and_stable_ties():
    sizes = np.array([3, 3, 3, 3, 5, 5, 1])
    a = assign_clients(sizes, 3)
    b = assign_clients(sizes.copy(), 3)
    assert np.array_equal(a, b)
    # equal sizes keep client order: the first of the tied clients is dealt first
    assert a.tolist() == [2, 2, 1, 0, 0, 1, 0]


def test_assign_single_actor():
    assert assign_clients(np.array([4, 8, 1]), 1).tolist() == [0, 0, 0]


# ---------------------------------------------------------------- threads and GPU share


def test_torch_threads():
    assert torch_threads(0.25) == 1
    assert torch_threads(1) == 1
    assert torch_threads(1.9) == 1
    assert torch_threads(2.7) == 2
    assert torch_threads(4) == 4


def test_gpu_memory_fraction():
    assert gpu_memory_fraction(0) is None
    assert gpu_memory_fraction(0.0) is None
    assert gpu_memory_fraction(0.25) == 0.25
    assert gpu_memory_fraction(1) == 1.0
    assert gpu_memory_fraction(2) == 1.0


def test_actor_device_is_cpu_without_gpus():
    assert actor_device(0.0).type == "cpu"


def test_actor_device_refuses_a_gpu_torch_cannot_see(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(RuntimeError, match="resources.gpus_per_actor=0.25"):
        actor_device(0.25)


def test_an_overrun_gpu_share_is_one_line_naming_the_key():
    with pytest.raises(GpuShareExceeded) as info:
        with within_gpu_share("attacks.pool.gpus_per_actor", 0.25, "attacker 1"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("attacker 1: out of GPU memory within its share attacks.pool.gpus_per_actor=0.25")
    assert "raise attacks.pool.gpus_per_actor" in message and "Tried to allocate 2.00 GiB" in message
    with within_gpu_share("resources.gpus_per_actor", 0.5, "client actor 0"):
        pass  # no error: nothing happens
