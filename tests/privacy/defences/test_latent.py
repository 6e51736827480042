"""The latent-perturbation minimax defence: noise really applied and learned, D kept on the server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simfl.core.config import ModelConfig, TrainingConfig
from simfl.core.training import train_client
from simfl.core.weights import FlatWeights
from simfl.data import Dataset
from simfl.privacy.attacks.analytic import recover
from simfl.privacy.attacks.functional import stack, victim_simulator
from simfl.privacy.attacks.observation import observe_gradient
from simfl.privacy.defences import defended_model
from simfl.privacy.defences.latent import (
    LatentConfig,
    LatentNoise,
    antithetic_draws,
    known_objective,
    known_victim,
    latent_off,
)

SHAPE = (3, 16, 4)


def _defended(**knobs):
    """The smoke-size model with the latent defence built in, as every process builds it."""
    return defended_model(ModelConfig(arch="convnet", width=8), LatentConfig(**knobs), 0, SHAPE)


def _data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, SHAPE[2], (n,), generator=g)
    base = torch.rand(SHAPE[2], 16, 16, 3, generator=g) * 200
    x = (base[y] + torch.rand(n, 16, 16, 3, generator=g) * 55).to(torch.uint8)
    return x, y


def _dataset(n: int = 300) -> Dataset:
    x, y = _data(n, seed=1)
    split = (x.numpy(), y.numpy())
    return Dataset.from_splits("t", ["a", "b", "c", "d"], {"train": split, "val": split, "test": split})


def _server_and_client(**knobs):
    torch.manual_seed(0)
    server_model, server = _defended(**knobs)
    FlatWeights(server_model)
    server.server_setup(_dataset(), server_model)
    torch.manual_seed(0)
    client_model, client = _defended(**knobs)
    flat = FlatWeights(client_model)
    client.receive(server.broadcast(), torch.device("cpu"))
    return server, server_model, client, client_model, flat


def test_noise_is_drawn_in_training_only_and_from_the_given_generator():
    layer = LatentNoise(5, sigma_init=0.3, sigma_max=1.0, mean_shift=False)
    z = torch.randn(4, 5)
    layer.train()
    layer.generator = torch.Generator().manual_seed(1)
    a = layer(z)
    layer.generator = torch.Generator().manual_seed(1)
    assert torch.equal(a, layer(z))
    layer.generator = torch.Generator().manual_seed(2)
    b = layer(z)
    assert not torch.allclose(a, b)
    assert torch.allclose((a - z).std(), torch.tensor(0.3), atol=0.15)
    layer.eval()
    assert torch.equal(layer(z), z)  # eval: the expected latent
    layer.mode = "off"
    layer.train()
    assert torch.equal(layer(z), z)


def test_sigma_starts_at_sigma_init_and_never_exceeds_the_cap():
    layer = LatentNoise(3, sigma_init=0.2, sigma_max=0.5, mean_shift=True)
    assert torch.allclose(layer.sigma(), torch.full((3,), 0.2), atol=1e-6)
    with torch.no_grad():
        layer.rho.fill_(50.0)
    assert float(layer.sigma().detach().max()) <= 0.5
    assert layer.shift is not None and layer.shift.requires_grad


def test_adaptive_draws_average_to_the_expected_latent():
    torch.manual_seed(0)
    model, _ = _defended(sigma_init=0.5)
    dim = model.latent_dim
    draws = antithetic_draws(6, dim, seed=0)
    assert draws.shape == (6, dim) and torch.allclose(draws.mean(0), torch.zeros(dim), atol=1e-6)
    assert torch.equal(antithetic_draws(1, dim, 0), torch.zeros(1, dim))
    x = torch.rand(2, 3, 16, 16)
    expectation = known_victim(model, draws, None).eval()
    assert expectation(x).shape == (12, SHAPE[2])
    # The draws average out in the latent, so the mean perturbed latent is the clean one.
    z = model.encoder(x)
    assert torch.allclose(expectation.latent(z).view(6, 2, -1).mean(0), z, atol=1e-5)
    naive = latent_off(model).train()
    assert torch.equal(naive.latent(z), z)


def test_the_decoder_is_not_part_of_what_clients_share():
    _, _, client, model, flat = _server_and_client()
    names = [name for name, _, _ in flat.layout]
    assert "latent.rho" in names and not any("decoder" in n or n.startswith("fc.") for n in names)
    decoder_params = sum(p.numel() for p in client.decoder.parameters())
    model_params = sum(p.numel() for p in model.parameters())
    assert len(flat) == model_params and decoder_params > 0


def test_client_training_learns_sigma_and_never_computes_or_changes_the_decoder():
    _, _, client, model, flat = _server_and_client(lam=1.0)
    before = client.decoder_flat.snapshot()
    x, y = _data()
    cfg = TrainingConfig(local_epochs=2, batch_size=16)
    start = flat.snapshot()
    local = train_client(model, flat, start, x, y, cfg, torch.Generator().manual_seed(0), client, {})
    rho = flat.as_dict(local.delta)["latent.rho"]
    assert rho.abs().max() > 1e-4  # σ moved
    assert torch.equal(client.decoder_flat.snapshot(), before)
    assert all(p.grad is None and not p.requires_grad for p in client.decoder.parameters())
    assert 0.0 < local.defence["decoder_mse"] < 1.0
    # Same generator, same update: the noise comes from (seed, client, round) only.
    again = train_client(model, flat, start, x, y, cfg, torch.Generator().manual_seed(0), client, {})
    assert torch.equal(local.delta, again.delta)
    other = train_client(model, flat, start, x, y, cfg, torch.Generator().manual_seed(1), client, {})
    assert not torch.equal(local.delta, other.delta)


def test_the_privacy_weight_pushes_sigma_up():
    """λ = 0: only cross-entropy, which the noise hurts, so σ shrinks; the privacy term rewards noise."""
    change = {}
    for lam in (0.0, 20.0):
        _, _, client, model, flat = _server_and_client(lam=lam, sigma_init=0.5, sigma_max=3.0, decoder_steps=100)
        x, y = _data()
        local = train_client(model, flat, flat.snapshot(), x, y, TrainingConfig(local_epochs=3, batch_size=16),
                             torch.Generator().manual_seed(0), client, {})
        change[lam] = float(flat.as_dict(local.delta)["latent.rho"].mean())
    assert change[0.0] < 0 and change[20.0] > change[0.0] + 1e-4


def test_server_trains_the_decoder_and_adapts_lambda_towards_the_train_accuracy_target():
    server, model, *_ = _server_and_client(train_accuracy_target=0.8, lam=0.5, dual_lr=1.0, decoder_steps=30)
    first = server.server_round(1, model, [{"samples": 10, "accuracy": 0.9}])
    assert first["lam"] == pytest.approx(0.6)  # above target: more privacy
    second = server.server_round(2, model, [{"samples": 10, "accuracy": 0.5}])
    assert second["lam"] == pytest.approx(0.3)  # below target: less
    for r in range(3, 8):
        last = server.server_round(r, model, [{"samples": 10, "accuracy": 0.8}])
    assert last["decoder_mse_server"] < first["decoder_mse_server"]  # D learns on server data
    assert 0 < last["sigma_min"] <= last["sigma_mean"] + 1e-6 and last["sigma_mean"] <= last["sigma_max"] + 1e-6
    state = server.server_state()
    clone, *_ = _server_and_client(train_accuracy_target=0.8)
    clone.load_server_state(state)
    assert torch.equal(clone.broadcast()["decoder"], server.broadcast()["decoder"]) and clone.lam == server.lam


def test_fixed_lambda_does_not_move():
    server, model, *_ = _server_and_client(lam=0.25)
    assert server.server_round(1, model, [{"samples": 1, "accuracy": 1.0}])["lam"] == 0.25


def test_shared_gradient_includes_the_noise_and_the_privacy_term():
    _, _, client, model, flat = _server_and_client(lam=1.0, sigma_init=0.5)
    x, y = _data(4)
    xf = x.permute(0, 3, 1, 2).float() / 255
    g1 = client.shared_gradient(model, flat, xf, y, torch.Generator().manual_seed(0))
    g2 = client.shared_gradient(model, flat, xf, y, torch.Generator().manual_seed(1))
    assert not torch.allclose(g1, g2)  # noise drawn from the generator
    assert flat.as_dict(g1)["latent.rho"].abs().sum() > 0
    client.lam = 0.0
    without_term = client.shared_gradient(model, flat, xf, y, torch.Generator().manual_seed(0))
    assert not torch.allclose(without_term, g1)  # −λ·MSE(D(z'), x) is part of what the client differentiates
    assert np.isfinite(g1.numpy()).all()


@pytest.mark.parametrize("lam", [0.0, 2.0])
def test_an_attacker_told_the_noise_and_the_decoder_simulates_the_victims_gradient_exactly(lam):
    """The adaptive attacker's model of the victim is exact: given the victim's own ε, it reproduces what was shared."""
    server, _, client, model, flat = _server_and_client(lam=lam, sigma_init=0.5)
    x, y = _data(1)
    xf = x.permute(0, 3, 1, 2).float() / 255
    obs = observe_gradient(model, flat, flat.snapshot(), xf, y, client, torch.Generator().manual_seed(7))
    eps = torch.randn((1, model.latent_dim), generator=torch.Generator().manual_seed(7))  # the victim's draw
    disclosure = client.disclosure(server.broadcast())
    module = known_victim(model, eps, disclosure.model_wrapper.keywords["decoder"]).eval()
    loss = lambda out, t: known_objective(out, t, copies=1, lam=lam)  # noqa: E731
    stacked = stack([obs], flat)
    simulated = victim_simulator(module, flat, stacked, loss)(stacked.weights[0], stacked.sgd[0], xf, y)
    assert torch.allclose(simulated, stacked.target[0], atol=1e-5, rtol=1e-4)
    # The naive attacker's model (no noise, no privacy term) does not.
    naive = victim_simulator(latent_off(model).eval(), flat, stacked, torch.nn.functional.cross_entropy)
    assert not torch.allclose(naive(stacked.weights[0], stacked.sgd[0], xf, y), stacked.target[0], atol=1e-4)


def test_local_noise_parameters_are_never_sent_and_follow_their_client():
    server, server_model, client, model, flat = _server_and_client(sigma_init=0.5, shared_noise=False)
    local = torch.tensor([name.startswith("latent.") for name, _, shape in flat.layout for _ in range(shape.numel())])
    x, y = _data(32)
    weights = flat.snapshot()
    state: dict = {}
    first = train_client(model, flat, weights, x, y, TrainingConfig(batch_size=8), torch.Generator().manual_seed(0),
                         client, state)
    assert (first.delta[local] == 0).all() and (first.delta[~local] != 0).any()  # ρ's change is not in the update
    own = state["latent_noise"]
    assert not torch.equal(own, weights[local])  # the client trained its own ρ and keeps it
    # Next round it starts from its own ρ, not from the global one (which the server never updates).
    seen = []
    model.latent.register_forward_pre_hook(lambda m, inputs: seen.append(m.rho.detach().clone()))
    train_client(model, flat, weights, x, y, TrainingConfig(batch_size=8, local_steps=1),
                 torch.Generator().manual_seed(1), client, state)
    assert torch.equal(seen[0], own)
    shared = observe_gradient(model, flat, weights, x[:1], y[:1], client, torch.Generator().manual_seed(2), state)
    assert (shared.shared[local] == 0).all()
    assert recover(model, flat, shared).noise is None  # nothing of the noise left the client
