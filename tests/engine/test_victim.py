"""What an attacked client hands over in the engine, and what is kept aside for scoring."""

import io

import pytest
import torch

from simfl.core.config import ModelConfig, TrainingConfig
from simfl.core.models import build_model
from simfl.core.seeding import torch_generator
from simfl.core.training import to_input, train_client
from simfl.core.weights import FlatWeights
from simfl.engine.scenario import AttacksConfig
from simfl.engine.victim import batch_statistics, capture, victim_from_state, victim_state
from simfl.privacy.attacks.labels import recover_labels
from simfl.privacy.attacks.observation import observe_gradient

TRAINING = TrainingConfig(local_epochs=1, batch_size=4, optimizer={"kind": "sgd", "lr": 0.1, "momentum": 0.9})


def setup(norm="group", n=10):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="convnet", norm=norm, width=4), 3, 8, 4)
    flat = FlatWeights(model)
    x = torch.randint(0, 256, (n, 8, 8, 3), dtype=torch.uint8)  # the shard format: uint8 NHWC
    y = torch.randint(0, 4, (n,))
    weights = flat.snapshot()
    local = train_client(model, flat, weights, x, y, TRAINING, torch_generator(0, "t", 1))
    return model, flat, weights, x, y, local


def test_gradient_view_shares_the_gradient_of_its_chosen_batch_only():
    model, flat, weights, x, y, local = setup()
    cfg = AttacksConfig(batch_size=3, labels="known")
    v = capture(model, flat, weights, x, y, cfg, TRAINING, local, seed=0, client=7, round_=2)
    assert v.images.shape == (3, 3, 8, 8) and v.images.dtype == torch.float32
    assert v.private.dtype == torch.uint8 and torch.equal(to_input(v.private), v.images)
    expected = observe_gradient(model, flat, weights, v.images, v.labels)
    assert torch.equal(v.observation.shared, expected.shared)
    assert torch.equal(v.observation.weights, weights)
    assert torch.equal(v.observation.labels, v.labels)
    # The batch is drawn from (seed, client, round): another round draws another batch.
    again = capture(model, flat, weights, x, y, cfg, TRAINING, local, seed=0, client=7, round_=2)
    other = capture(model, flat, weights, x, y, cfg, TRAINING, local, seed=0, client=7, round_=3)
    assert torch.equal(again.images, v.images) and not torch.equal(other.images, v.images)
    # Every chosen image is one of the client's own.
    pool = to_input(x).flatten(1)
    assert all((pool == img.flatten()).all(1).any() for img in v.images)


def test_recovered_labels_are_hidden_from_the_observation_but_kept_for_scoring():
    model, flat, weights, x, y, local = setup()
    v = capture(model, flat, weights, x, y, AttacksConfig(batch_size=1), TRAINING, local, 0, 1, 1)
    assert v.observation.labels is None and v.labels.shape == (1,)
    assert torch.equal(recover_labels(flat, v.observation), v.labels)  # iDLG, B = 1


def test_update_view_shares_the_real_update_with_its_hyperparameters():
    model, flat, weights, x, y, local = setup()
    v = capture(model, flat, weights, x, y, AttacksConfig(view="update", labels="known"), TRAINING, local, 0, 1, 1)
    o = v.observation
    assert torch.equal(o.shared, local.delta)
    assert (o.batch_size, o.local_steps, o.local_batch_size) == (10, 3, 4)
    assert (o.lr, o.momentum, o.weight_decay) == (0.1, 0.9, 0.0)
    assert torch.equal(v.images, to_input(x)) and torch.equal(v.labels, y)


def test_known_batchnorm_statistics_replace_the_running_ones():
    model, flat, weights, x, y, local = setup(norm="batch")
    cfg = AttacksConfig(batch_size=4, bn_stats="batch", labels="known")
    v = capture(model, flat, weights, x, y, cfg, TRAINING, local, 0, 1, 1)
    assert not torch.equal(v.observation.weights, weights)
    # The victim's train-mode forward (batch statistics) ...
    flat.load(weights)
    with torch.no_grad():
        victim = model.train()(v.images)
    # ... is what the attacker's eval-mode forward gives at the disclosed statistics.
    flat.load(v.observation.weights)
    with torch.no_grad():
        attacker = model.eval()(v.images)
    assert torch.allclose(attacker, victim, atol=1e-5)
    running = capture(model, flat, weights, x, y, AttacksConfig(batch_size=4, labels="known"), TRAINING, local, 0, 1, 1)
    assert torch.equal(running.observation.weights, weights)


def test_batch_statistics_record_nothing_without_batchnorm_or_in_eval_mode():
    model, flat, weights, x, y, local = setup(norm="batch")
    model.eval()
    with batch_statistics(model) as stats, torch.no_grad():
        model(to_input(x))
    assert stats == {}
    group, *_ = setup(norm="group")
    with batch_statistics(group.train()) as stats, torch.no_grad():
        group(to_input(x))
    assert stats == {}


@pytest.mark.parametrize("view", ["gradient", "update"])
def test_a_victim_survives_a_weights_only_checkpoint(view):
    model, flat, weights, x, y, local = setup()
    v = capture(model, flat, weights, x, y, AttacksConfig(view=view), TRAINING, local, 0, 5, 3)
    buf = io.BytesIO()
    torch.save({"jobs": [victim_state(v)]}, buf)
    buf.seek(0)
    back = victim_from_state(torch.load(buf, weights_only=True)["jobs"][0])
    assert (back.round, back.client_id, back.group) == (v.round, v.client_id, v.group)
    assert torch.equal(back.private, v.private) and torch.equal(back.observation.shared, v.observation.shared)
    assert back.observation.labels is None
