import itertools
import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity as sk_ssim
from torch import nn

from simfl.privacy.metrics import (
    PSNR_MAX_DB,
    attacker_accuracy,
    baseline_images,
    class_mean_images,
    label_accuracy,
    match,
    mse,
    nn_rank,
    psnr,
    score,
    score_baselines,
    score_batch,
    ssim,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def structured(n: int, c: int, hw: int, seed: int) -> torch.Tensor:
    """Smooth blobs plus oriented stripes: image-like content with flat regions and edges."""
    g = gen(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, hw), torch.linspace(0, 1, hw), indexing="ij")
    out = torch.zeros(n, c, hw, hw)
    for i in range(n):
        for ch in range(c):
            img = torch.zeros(hw, hw)
            for _ in range(3):
                cy, cx, s, amp = torch.rand(4, generator=g).tolist()
                img += (0.3 + amp) * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.05 + 0.2 * s) ** 2))
            theta, freq = torch.rand(2, generator=g).tolist()
            img += 0.2 * torch.sin(2 * math.pi * (2 + 6 * freq) * (xx * math.cos(6 * theta) + yy * math.sin(6 * theta)))
            out[i, ch] = img
    lo = out.amin(dim=(2, 3), keepdim=True)
    hi = out.amax(dim=(2, 3), keepdim=True)
    return (out - lo) / (hi - lo)


def skimage_ref(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, win_size=None) -> torch.Tensor:
    """skimage's standard Gaussian SSIM, image by image, computed in float64."""
    vals = []
    for x, y in zip(a.double().numpy(), b.double().numpy()):
        kw = dict(
            data_range=data_range, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, win_size=win_size
        )
        if x.shape[0] == 1:  # grayscale: plain 2-D call, as users would make it
            vals.append(sk_ssim(x[0], y[0], **kw))
        else:  # skimage wants channels last
            vals.append(sk_ssim(np.moveaxis(x, 0, -1), np.moveaxis(y, 0, -1), channel_axis=-1, **kw))
    return torch.tensor(vals, dtype=torch.float64)


# ------------------------------------------------------------------ mse / psnr


def test_mse_and_psnr_known_values():
    a = torch.zeros(3, 1, 8, 8)
    b = a.clone()
    b[0] += 0.1  # mse 0.01 -> 20 dB
    b[1, :, :4] = 1.0  # half the pixels off by 1 -> mse 0.5 -> 3.0103 dB
    m = mse(a, b)
    assert m.shape == (3,) and m.dtype == torch.float64
    torch.testing.assert_close(m, torch.tensor([0.01, 0.5, 0.0], dtype=torch.float64), rtol=1e-6, atol=0)
    p = psnr(a, b)
    torch.testing.assert_close(p[:2], torch.tensor([20.0, 10 * math.log10(2)], dtype=torch.float64), rtol=1e-6, atol=0)
    assert p[2] == PSNR_MAX_DB  # identical image: capped, finite


def test_psnr_cap_and_uncapped_and_data_range():
    a = torch.rand(4, 3, 16, 16, generator=gen(0))
    b = (a + 0.05 * torch.randn(a.shape, generator=gen(1))).clamp(0, 1)
    assert torch.isfinite(psnr(a, a)).all() and (psnr(a, a) == PSNR_MAX_DB).all()
    assert torch.isinf(psnr(a, a, max_db=float("inf"))).all()
    tiny = a.double() + 1e-7  # float-rounding copy: above the cap -> capped
    assert (psnr(a.double(), tiny) == PSNR_MAX_DB).all()
    # Same images on a 0..255 scale give the same PSNR with data_range=255.
    torch.testing.assert_close(psnr(a * 255, b * 255, data_range=255.0), psnr(a, b), rtol=1e-6, atol=1e-6)
    assert (psnr(a, b) < 40).all() and (psnr(a, b) > 20).all()


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError):
        mse(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9))
    with pytest.raises(ValueError):
        ssim(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))


# ------------------------------------------------------------------ ssim


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("hw", [8, 9, 11, 16, 28, 64])
def test_ssim_matches_skimage(c, hw):
    win = None if hw >= 11 else (7 if hw == 8 else 9)  # what our default picks where skimage's 11 does not fit
    cases = []
    a = torch.rand(3, c, hw, hw, generator=gen(hw))
    cases.append((a, torch.rand(3, c, hw, hw, generator=gen(hw + 100))))  # unrelated noise
    cases.append((a, (a + 0.1 * torch.randn(a.shape, generator=gen(2))).clamp(0, 1)))  # noisy copy
    s = structured(3, c, hw, seed=hw)
    cases.append((s, structured(3, c, hw, seed=hw + 1)))  # unrelated structure
    cases.append((s, (0.8 * s + 0.1 + 0.03 * torch.randn(s.shape, generator=gen(3))).clamp(0, 1)))  # contrast + noise
    cases.append((s, s.flip(-1)))
    cases.append((torch.full((2, c, hw, hw), 0.3), torch.full((2, c, hw, hw), 0.7)))  # flat images (zero variance)
    worst = 0.0
    for x, y in cases:
        got = ssim(x, y)
        assert got.shape == (x.shape[0],) and got.dtype == torch.float64
        ref = skimage_ref(x, y, win_size=win)
        worst = max(worst, float((got - ref).abs().max()))
    assert worst < 1e-5, worst


def test_ssim_data_range_matches_skimage():
    a = structured(2, 3, 32, seed=7) * 255
    b = (a + 10 * torch.randn(a.shape, generator=gen(4))).clamp(0, 255)
    torch.testing.assert_close(ssim(a, b, data_range=255.0), skimage_ref(a, b, 255.0), rtol=0, atol=1e-5)
    # data_range matters (stabilisers C1, C2 scale with it): a wrong range gives a different number.
    assert float((ssim(a, b, data_range=1.0) - ssim(a, b, data_range=255.0)).abs().max()) > 1e-3


def test_ssim_identical_is_one_unrelated_near_zero():
    a = torch.rand(8, 3, 64, 64, generator=gen(5))
    torch.testing.assert_close(ssim(a, a), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-12)
    s = structured(4, 1, 32, seed=9)
    torch.testing.assert_close(ssim(s, s), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    b = torch.rand(8, 3, 64, 64, generator=gen(6))
    assert float(ssim(a, b).abs().max()) < 0.05


def test_ssim_float32_input_close_to_float64_and_batch_independent():
    a = structured(6, 3, 32, seed=11)
    b = (a + 0.05 * torch.randn(a.shape, generator=gen(8))).clamp(0, 1)
    full = ssim(a, b)
    torch.testing.assert_close(full, ssim(a.double(), b.double()), rtol=0, atol=1e-6)
    # Each image's value depends on that pair only (no cross-talk through the batched conv).
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(ssim(a[perm], b[perm]), full[perm], rtol=0, atol=1e-12)
    torch.testing.assert_close(ssim(a[2:3], b[2:3]), full[2:3], rtol=0, atol=1e-12)


def test_ssim_small_images_default_window_and_errors():
    a = torch.rand(2, 1, 8, 8, generator=gen(12))
    b = torch.rand(2, 1, 8, 8, generator=gen(13))
    # Default on 8x8 equals skimage with win_size=7 (skimage itself refuses 11 here).
    torch.testing.assert_close(ssim(a, b), skimage_ref(a, b, win_size=7), rtol=0, atol=1e-10)
    with pytest.raises(ValueError):
        ssim(a, b, win_size=11)
    with pytest.raises(ValueError):
        ssim(a, b, win_size=4)


# ------------------------------------------------------------------ match


@pytest.mark.parametrize("cost", ["mse", "neg_ssim"])
def test_match_recovers_permuted_batch(cost):
    orig = structured(8, 3, 16, seed=20)
    perm = torch.randperm(8, generator=gen(21))
    recon = (orig[perm] + 0.05 * torch.randn(orig.shape, generator=gen(22))).clamp(0, 1)
    got = match(recon, orig, cost=cost)
    assert got.dtype == torch.long
    assert torch.equal(got, perm)


def test_match_optimal_where_greedy_is_not():
    # Constant images: pairwise cost is (r - o)^2.  Both reconstructions are
    # nearest to original 0; best-of-batch would credit original 0 twice.
    orig = torch.stack([torch.full((1, 8, 8), 0.5), torch.full((1, 8, 8), 1.0)])
    recon = torch.stack([torch.full((1, 8, 8), 0.55), torch.full((1, 8, 8), 0.4)])
    cost = torch.stack([mse(r.expand_as(orig), orig) for r in recon])
    best_of_batch = cost.argmin(dim=1)
    assert best_of_batch.tolist() == [0, 0]  # the optimistic double claim
    # Greedy without replacement (take the globally cheapest pair first): r0-o0 (0.0025), then r1-o1 (0.36).
    c = cost.clone()
    greedy_total = 0.0
    for _ in range(2):
        i, j = divmod(int(c.argmin()), 2)
        greedy_total += float(c[i, j])
        c[i, :] = c[:, j] = float("inf")
    assert greedy_total == pytest.approx(0.0025 + 0.36)
    perm = match(recon, orig)
    assert perm.tolist() == [1, 0]
    total = float(cost[torch.arange(2), perm].sum())
    assert total == pytest.approx(0.2025 + 0.01)
    assert total < greedy_total - 0.1
    assert total > float(cost[torch.arange(2), best_of_batch].sum())  # honest number is worse than optimistic


def test_match_total_cost_is_brute_force_minimum():
    orig = torch.rand(6, 1, 8, 8, generator=gen(30))
    recon = torch.rand(6, 1, 8, 8, generator=gen(31))
    cost = torch.stack([mse(r.expand_as(orig), orig) for r in recon])
    best = min(float(cost[torch.arange(6), torch.tensor(p)].sum()) for p in itertools.permutations(range(6)))
    perm = match(recon, orig)
    assert sorted(perm.tolist()) == list(range(6))
    assert float(cost[torch.arange(6), perm].sum()) == pytest.approx(best, rel=1e-12)


def test_match_fewer_reconstructions_and_errors():
    orig = structured(5, 1, 16, seed=40)
    got = match(orig[[3, 1]] + 0.01, orig)
    assert got.tolist() == [3, 1]
    with pytest.raises(ValueError):
        match(orig, orig[:3])
    with pytest.raises(ValueError):
        match(orig, orig, cost="l1")


# ------------------------------------------------------------------ labels


def test_label_accuracy_multiset():
    true = torch.tensor([0, 0, 1, 2])
    # Same multiset in another order: positional accuracy would be 0.
    assert label_accuracy(torch.tensor([2, 1, 0, 0]), true) == 1.0
    # class 0: min(1, 2) = 1, class 1: min(2, 1) = 1, class 2: 0, class 3: 0 -> 2/4
    assert label_accuracy(torch.tensor([0, 1, 1, 3]), true) == 0.5
    assert label_accuracy(torch.tensor([5, 5, 5, 5]), true) == 0.0
    assert label_accuracy(torch.tensor([0, 0, 0, 0]), true) == 0.5


def test_label_accuracy_refuses_wrong_size():
    true = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError):  # guessing every class would otherwise score 1.0
        label_accuracy(torch.tensor([0, 1, 2, 3, 4]), true)
    with pytest.raises(ValueError):
        label_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))


# ------------------------------------------------------------------ baselines / score


def test_baselines_deterministic_and_shaped():
    orig = structured(4, 3, 16, seed=50)
    r1 = baseline_images(orig, "random", gen(7))
    r2 = baseline_images(orig, "random", gen(7))
    r3 = baseline_images(orig, "random", gen(8))
    assert r1.shape == orig.shape and r1.dtype == orig.dtype
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    assert float(r1.min()) >= 0.0 and float(r1.max()) <= 1.0 and float(r1.std()) > 0.25
    ref = structured(20, 3, 16, seed=51).mean(dim=0)
    m = baseline_images(orig, "mean", None, reference_mean=ref)
    assert m.shape == orig.shape
    assert all(torch.equal(img, ref) for img in m)
    with pytest.raises(ValueError):
        baseline_images(orig, "mean", None)
    with pytest.raises(ValueError):
        baseline_images(orig, "mean", None, reference_mean=ref[:1])
    with pytest.raises(ValueError):
        baseline_images(orig, "random", None)


def test_score_good_reconstruction_beats_baselines():
    data = structured(24, 3, 32, seed=60)
    ref_mean = data.mean(dim=0)
    orig = data[:8]
    perm = torch.randperm(8, generator=gen(61))
    good = (orig[perm] + 0.01 * torch.randn(orig.shape, generator=gen(62))).clamp(0, 1)

    s = score(good, orig)
    assert set(s) == {"mse", "psnr", "ssim", "perm"}
    assert torch.equal(s["perm"], perm)
    torch.testing.assert_close(s["ssim"], ssim(good, orig[perm]))
    torch.testing.assert_close(s["psnr"], psnr(good, orig[perm]))
    torch.testing.assert_close(s["mse"], mse(good, orig[perm]))

    for kind in ("random", "mean"):
        base = score(baseline_images(orig, kind, gen(63), reference_mean=ref_mean), orig)
        assert float(s["psnr"].min()) > float(base["psnr"].max()) + 15, kind
        assert float(s["ssim"].min()) > float(base["ssim"].max()) + 0.3, kind
    # The dataset mean is a much better "no leakage" floor than noise: reporting
    # only against noise would flatter the attack.
    mean_base = score(baseline_images(orig, "mean", None, reference_mean=ref_mean), orig)
    rand_base = score(baseline_images(orig, "random", gen(64)), orig)
    assert float(mean_base["psnr"].mean()) > float(rand_base["psnr"].mean())


# ------------------------------------------------------------------ attacker accuracy


class MeanIntensityClassifier(nn.Module):
    """Class 1 iff mean intensity > 0.5 (logits x - 0.5 vs 0.5 - x); records how it was called."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.fc.bias.copy_(torch.tensor([0.5, -0.5]))
        self.calls: list[tuple[int, bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], self.training, torch.is_grad_enabled()))
        return self.fc(x.mean(dim=(1, 2, 3)).unsqueeze(1))


def test_attacker_accuracy_known_decisions():
    levels = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.45, 0.55])
    recon = levels.view(-1, 1, 1, 1).expand(-1, 3, 8, 8).clone()
    predicted = (levels > 0.5).long()
    true = predicted.clone()
    true[[0, 5, 9]] = 1 - true[[0, 5, 9]]  # three wrong
    clf = MeanIntensityClassifier()
    clf.train()
    assert attacker_accuracy(clf, recon, true, batch_size=3) == pytest.approx(0.7)
    assert [c[0] for c in clf.calls] == [3, 3, 3, 1]  # batched
    assert all(not training and not grad for _, training, grad in clf.calls)  # eval + no_grad
    assert clf.training  # caller's mode restored
    assert attacker_accuracy(clf, recon, predicted) == 1.0
    assert attacker_accuracy(clf, recon, 1 - predicted) == 0.0
    with pytest.raises(ValueError):
        attacker_accuracy(clf, recon, true[:5])


class _Oracle(torch.nn.Module):
    """A 'classifier' that reads the label off pixel (0, 0, 0): class = round(value * 3)."""

    def forward(self, x):
        return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 3).round().long().clamp(0, 3), 4).float()


def test_score_batch_scores_each_image_and_both_baselines_the_same_way():
    gen = torch.Generator().manual_seed(0)
    orig = torch.rand(3, 3, 16, 16, generator=gen)
    labels = torch.tensor([0, 2, 3])
    orig[:, 0, 0, 0] = labels / 3
    recon = orig[[2, 0, 1]].clone()  # a perfect reconstruction, in another order
    class_means = torch.stack([torch.full((3, 16, 16), k / 3) for k in range(4)])
    rows = score_batch(recon, orig, labels, torch.tensor([3, 0, 2]), _Oracle(), orig.mean(0),
                       torch.Generator().manual_seed(1), class_means)
    assert [r["matched_image"] for r in rows] == [2, 0, 1]
    assert [r["true_label"] for r in rows] == [3, 0, 2]
    for r in rows:
        assert r["psnr"] == 100.0 and r["mse"] == 0.0 and r["ssim"] == pytest.approx(1.0)
        assert r["attacker_correct"] and r["evaluator_on_original"] and r["label_accuracy"] == 1.0
        assert r["random_psnr"] < 15 and r["mean_psnr"] < r["psnr"] and r["random_ssim"] < 0.2
    # The baselines are the module's own: same draw, same score.
    noise = baseline_images(orig, "random", torch.Generator().manual_seed(1))
    assert [r["random_psnr"] for r in rows] == score(noise, orig)["psnr"].tolist()
    assert sum(r["mean_attacker_correct"] for r in rows) == 1  # the mean pixel reads as one class only
    # The class-mean guess of each original's label, scored by the same pipeline (its own matching).
    guess = class_mean_images(class_means, labels)
    scored = score(guess, orig)
    assert [r["class_mean_psnr"] for r in rows] == scored["psnr"].tolist()
    assert [r["class_mean_attacker_correct"] for r in rows] == (
        _Oracle()(guess).argmax(1) == labels[scored["perm"]]).tolist()
    assert all(r["class_mean_psnr"] < r["psnr"] for r in rows)


def test_baselines_scored_once_give_every_attack_the_rows_it_would_score_itself():
    gen = torch.Generator().manual_seed(0)
    orig = torch.rand(3, 3, 16, 16, generator=gen)
    labels = torch.tensor([0, 2, 3])
    peers = torch.rand(5, 3, 16, 16, generator=gen)
    class_means = torch.stack([torch.full((3, 16, 16), k / 3) for k in range(4)])
    shared = score_baselines(orig, labels, _Oracle(), orig.mean(0), torch.Generator().manual_seed(1), class_means,
                             peers)
    for recon in (orig[[1, 2, 0]] + 0.05, torch.rand(3, 3, 16, 16, generator=gen)):  # two attacks' results
        alone = score_batch(recon, orig, labels, labels, _Oracle(), orig.mean(0), torch.Generator().manual_seed(1),
                            class_means, peers)
        assert score_batch(recon, orig, labels, labels, _Oracle(), baselines=shared) == alone
    with pytest.raises(ValueError, match="give the baselines"):
        score_batch(orig, orig, labels, labels, _Oracle())


def test_the_class_mean_guess_of_one_image_reads_as_its_class():
    orig = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    orig[0, 0, 0, 0] = 2 / 3
    class_means = torch.stack([torch.full((3, 16, 16), k / 3) for k in range(4)])
    [row] = score_batch(orig.clone(), orig, torch.tensor([2]), torch.tensor([2]), _Oracle(), orig[0],
                        torch.Generator().manual_seed(1), class_means)
    assert row["class_mean_attacker_correct"]
    assert row["class_mean_mse"] == pytest.approx(float((orig - 2 / 3).pow(2).mean()))


def test_class_mean_images_pick_each_labels_mean():
    class_means = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    guess = class_mean_images(class_means, torch.tensor([2, 0, 2]))
    assert guess[:, 0, 0, 0].tolist() == [2.0, 0.0, 2.0] and guess.shape == (3, 1, 2, 2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        class_mean_images(class_means, torch.tensor([3]))
    with pytest.raises(ValueError, match="class means of shape"):
        class_mean_images(class_means[0], torch.tensor([0]))


# ---------------------------------------------------------------- instance identification (nearest neighbour)


def flat_images(*levels: float, c: int = 1, hw: int = 4) -> torch.Tensor:
    """One constant image per level: distances between them are |a - b| * sqrt(C*H*W)."""
    return torch.tensor(levels).view(-1, 1, 1, 1).expand(-1, c, hw, hw).clone()


def test_nn_rank_is_one_plus_the_candidates_nearer_than_the_original():
    pool = structured(12, 3, 16, seed=7)
    images = structured(5, 3, 16, seed=8)
    truth = torch.tensor([0, 3, 3, 11, 6])
    d = ((images[:, None] - pool[None]) ** 2).flatten(2).sum(2).numpy()
    expected = [1 + int((d[i] < d[i, t]).sum()) for i, t in enumerate(truth.tolist())]
    assert nn_rank(images, pool, truth).tolist() == expected
    assert nn_rank(pool[[4, 9]], pool, torch.tensor([4, 9])).tolist() == [1, 1]  # an exact copy is its own nearest


def test_nn_rank_counts_ties_against_the_image():
    pool = flat_images(0.25, 0.75, 0.5)  # binary fractions: the equal distances below are exactly equal
    guess = flat_images(0.5, 0.625)  # 0.625 is as far from 0.5 as from 0.75
    assert nn_rank(guess, pool, torch.tensor([2, 2])).tolist() == [1, 2]
    assert nn_rank(guess[1:], pool, torch.tensor([1])).tolist() == [2]


def test_nn_rank_refuses_what_it_cannot_rank():
    pool = flat_images(0.1, 0.2)
    with pytest.raises(ValueError, match="true indices"):
        nn_rank(flat_images(0.1), pool, torch.tensor([2]))
    with pytest.raises(ValueError, match="1 true indices for 2 images"):
        nn_rank(flat_images(0.1, 0.2), pool, torch.tensor([0]))
    with pytest.raises(ValueError, match="incompatible shapes"):
        nn_rank(flat_images(0.1, hw=3), pool, torch.tensor([0]))


def test_a_class_mean_guess_hits_at_most_the_one_image_nearest_the_mean():
    # Twenty images of one class, each the victim in turn among the other nineteen: the class mean
    # is one image, so it is the nearest neighbour of at most one of them, whichever victim it is.
    images = structured(20, 3, 16, seed=11)
    mean = images.mean(0, keepdim=True)
    ranks = torch.cat([nn_rank(mean, images, torch.tensor([v])) for v in range(20)])
    assert int((ranks == 1).sum()) <= 1
    assert sorted(ranks.tolist()) == list(range(1, 21))  # every victim's rank is its distance order to the mean


def batch_rows(recon, orig, labels, peers, class_means=None):
    grey = torch.full(orig.shape[1:], 0.5)  # the mean image, and every class's mean unless given
    if class_means is None:
        class_means = torch.stack([grey] * (int(labels.max()) + 1))
    return score_batch(recon, orig, labels, labels, _Oracle(), grey, torch.Generator().manual_seed(1),
                       class_means, peers=peers)


def test_a_perfect_reconstruction_identifies_its_instance_and_a_class_mean_guess_does_not():
    # Victim 0.9 among same-class peers 0.45..0.6; its class mean (0.6) is nearer every peer than the victim.
    orig, peers = flat_images(0.9), flat_images(0.5, 0.55, 0.6, 0.45)
    class_means = torch.stack([flat_images(0.1)[0], flat_images(0.6)[0]])
    [row] = batch_rows(orig.clone(), orig, torch.tensor([1]), peers, class_means)
    assert row["nn_match"] and row["nn_rank"] == 1 and row["nn_pool_size"] == 5
    assert not row["class_mean_nn_match"] and row["class_mean_nn_rank"] == 5
    assert not row["mean_nn_match"] and row["mean_nn_rank"] == 5  # the mean image (0.5) is a peer's twin


def test_a_reconstruction_nearest_another_candidate_is_not_a_match():
    orig, peers = flat_images(0.9), flat_images(0.3, 0.5, 0.7)
    [row] = batch_rows(flat_images(0.65), orig, torch.tensor([0]), peers)
    assert not row["nn_match"] and row["nn_rank"] == 3  # 0.7 and 0.5 are nearer than the victim's 0.9
    [row] = batch_rows(flat_images(0.79), orig, torch.tensor([0]), peers)
    assert not row["nn_match"] and row["nn_rank"] == 2  # 0.7 by a hair
    [row] = batch_rows(flat_images(0.81), orig, torch.tensor([0]), peers)
    assert row["nn_match"] and row["nn_rank"] == 1


def test_nn_columns_use_the_hungarian_match_and_the_whole_batch_as_candidates():
    orig = structured(3, 3, 16, seed=5)
    labels = torch.tensor([0, 2, 3])
    orig[:, 0, 0, 0] = labels / 3
    recon = orig[[2, 0, 1]].clone()  # perfect, in another order
    rows = batch_rows(recon, orig, labels, structured(4, 3, 16, seed=6))
    assert [r["matched_image"] for r in rows] == [2, 0, 1]
    assert all(r["nn_match"] and r["nn_rank"] == 1 and r["nn_pool_size"] == 7 for r in rows)
    for prefix in ("random_", "mean_", "class_mean_"):
        assert all(isinstance(r[prefix + "nn_match"], bool) and r[prefix + "nn_rank"] >= 1 for r in rows)
    # The same guesses, scored by the same pipeline.
    guess = class_mean_images(torch.stack([torch.full((3, 16, 16), 0.5)] * 4), labels)
    pool = torch.cat([orig, structured(4, 3, 16, seed=6)])
    assert [r["class_mean_nn_rank"] for r in rows] == nn_rank(guess, pool, score(guess, orig)["perm"]).tolist()
    # Without peers the batch is the whole pool.
    assert {r["nn_pool_size"] for r in batch_rows(recon, orig, labels, None)} == {3}
