"""The attacker-accuracy classifier: trained on data no client has, cached, reloaded safely."""

import typing

import numpy as np
import pytest
import torch

from simfl.core.config import ModelConfig
from simfl.core.models import build_model
from simfl.data.synthetic import make_dataset
from simfl.privacy.evaluator import ARCH_NAME, build_evaluator, cache_key, load_or_train, train_evaluator


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(train_size=50, val_size=300, test_size=200, image_size=8, num_classes=4, seed=3)


@pytest.fixture(scope="module")
def trained(dataset):
    return train_evaluator(dataset)


def test_it_learns_the_task_well_above_chance(trained):
    assert trained.test_accuracy > 0.6  # 4 classes: chance is 0.25


def test_training_is_deterministic(dataset, trained):
    assert torch.equal(train_evaluator(dataset).weights, trained.weights)


def test_cache_is_written_once_then_loaded(dataset, tmp_path, monkeypatch):
    first, cached = load_or_train(dataset, tmp_path)
    assert not cached and len(list(tmp_path.glob("*.pt"))) == 1
    monkeypatch.setattr("simfl.privacy.evaluator.train_evaluator",
                        lambda *a: pytest.fail("retrained a cached evaluator"))
    again, cached = load_or_train(dataset, tmp_path)
    assert cached and torch.equal(again.weights, first.weights) and again.test_accuracy == first.test_accuracy


def test_an_unreadable_cache_file_is_replaced(dataset, tmp_path):
    (tmp_path / f"{cache_key(dataset)}.pt").write_bytes(b"not a checkpoint")
    evaluator, cached = load_or_train(dataset, tmp_path)
    assert not cached
    saved = torch.load(tmp_path / f"{cache_key(dataset)}.pt", weights_only=True)
    assert saved["test_accuracy"] == evaluator.test_accuracy


def test_the_key_follows_the_data_it_was_trained_on(dataset):
    other = make_dataset(train_size=50, val_size=300, test_size=200, image_size=8, num_classes=4, seed=4)
    assert cache_key(other) != cache_key(dataset)
    assert cache_key(dataset).startswith("synthetic_8px_")


def test_the_model_it_builds_gives_its_reported_accuracy(dataset, trained):
    model = trained.model(dataset.channels, dataset.image_size, dataset.num_classes)
    x = torch.from_numpy(np.array(dataset.test_x)).permute(0, 3, 1, 2).float() / 255
    acc = (model(x).argmax(1).numpy() == dataset.test_y).mean()
    assert acc == pytest.approx(trained.test_accuracy)


def signature(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """The layer types and parameter shapes, in order: equal for two instances of one architecture."""
    layers = [(type(m).__name__, ()) for m in model.modules() if not list(m.children())]
    return layers + [(name, tuple(p.shape)) for name, p in model.named_parameters()]


@pytest.mark.parametrize("arch", typing.get_args(ModelConfig.model_fields["arch"].annotation))
@pytest.mark.parametrize("norm", ["group", "batch"])
def test_its_architecture_is_none_a_scenario_can_attack(arch, norm):
    evaluator = build_evaluator(3, 28, 8)
    attacked = build_model(ModelConfig(arch=arch, norm=norm), 3, 28, 8)
    assert signature(evaluator) != signature(attacked)
    assert arch not in ARCH_NAME and type(evaluator) is not type(attacked)
    assert {type(m) for m in evaluator.modules()} != {type(m) for m in attacked.modules()}


def test_it_names_its_architecture_and_the_name_keys_the_cache(dataset, trained, monkeypatch):
    assert trained.arch == ARCH_NAME
    before = cache_key(dataset)
    monkeypatch.setattr("simfl.privacy.evaluator.ARCH_NAME", "another")
    assert cache_key(dataset) != before


def test_training_leaves_the_callers_random_state_alone(dataset):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_evaluator(dataset, seed=1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("size", [8, 28, 64])
def test_it_classifies_any_image_size(size):
    logits = build_evaluator(1, size, 5)(torch.rand(2, 1, size, size))
    assert logits.shape == (2, 5)
