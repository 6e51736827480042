import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from simfl.core.config import ShiftConfig
from simfl.data.acquisition import Devices, apply_shift, draw_devices


def images(n=64, size=28, channels=3, low=0, high=256, seed=0):
    return np.random.default_rng(seed).integers(low, high, (n, size, size, channels), dtype=np.uint8)


def shifted(x, seed=0, noise_seed=0, **shift):
    cfg = ShiftConfig(**shift)
    devices = draw_devices(cfg, seed, "client-device", np.arange(len(x)), x.shape[-1])
    return apply_shift(x, cfg, devices, noise_seed)


def channel_means(x):
    return x.astype(np.float64).mean(axis=(0, 1, 2))


def high_freq_energy(x):
    x = x.astype(np.float64)
    return (np.diff(x, axis=1) ** 2).mean() + (np.diff(x, axis=2) ** 2).mean()


# ---------------------------------------------------------------- devices


def test_identity_config_is_exact_identity():
    x = images()
    out = shifted(x)
    assert out.dtype == np.uint8 and np.array_equal(out, x)


def test_float_pipeline_round_trips_exactly():
    # a real (non-default) shift whose devices are numerically neutral goes through every float step
    x = images()
    assert np.array_equal(shifted(x, jitter=1e-9, color_jitter=1e-9), x)


def test_device_depends_only_on_seed_purpose_and_id():
    cfg = ShiftConfig(color=(1.2, 1.0, 0.8), color_jitter=0.1, brightness=0.05, jitter=0.1, contrast=1.1)
    all_ids = draw_devices(cfg, 7, "client-device", np.arange(100), 3)
    some = draw_devices(cfg, 7, "client-device", np.array([42, 3, 99]), 3)
    for row, cid in enumerate([42, 3, 99]):
        assert np.array_equal(some.gain[row], all_ids.gain[cid])
        assert some.brightness[row] == all_ids.brightness[cid]
        assert some.contrast[row] == all_ids.contrast[cid]
    other_purpose = draw_devices(cfg, 7, "test-device", np.arange(100), 3)
    other_seed = draw_devices(cfg, 8, "client-device", np.arange(100), 3)
    assert not np.array_equal(other_purpose.gain, all_ids.gain)
    assert not np.array_equal(other_seed.brightness, all_ids.brightness)


def test_device_jitter_statistics():
    cfg = ShiftConfig(color=(1.2, 1.0, 0.8), color_jitter=0.1, brightness=0.05, contrast=1.5, jitter=0.2)
    d = draw_devices(cfg, 0, "client-device", np.arange(5000), 3)
    assert d.gain.shape == (5000, 3) and d.gain.dtype == np.float32
    log_gain = np.log(d.gain)
    assert np.allclose(np.median(d.gain, axis=0), cfg.color, rtol=0.02)
    assert np.allclose(log_gain.std(axis=0), 0.1, rtol=0.06)
    assert abs(d.brightness.mean() - 0.05) < 0.01 and abs(d.brightness.std() - 0.2) < 0.012
    assert abs(np.median(d.contrast) - 1.5) < 0.03 and abs(np.log(d.contrast).std() - 0.2) < 0.012
    # channels drift independently
    assert abs(np.corrcoef(log_gain.T)[0, 1]) < 0.05


def test_no_jitter_gives_the_mean_device_everywhere():
    cfg = ShiftConfig(color=(1.2, 1.0, 0.8), brightness=-0.1, contrast=0.7)
    d = draw_devices(cfg, 0, "client-device", np.arange(10), 3)
    assert np.allclose(d.gain, [1.2, 1.0, 0.8])
    assert np.allclose(d.brightness, -0.1) and np.allclose(d.contrast, 0.7)


def test_grayscale_devices_use_the_mean_colour_and_share_the_rest():
    cfg = ShiftConfig(color=(1.3, 1.0, 0.7), color_jitter=0.1, brightness=0.02, jitter=0.1)
    gray = draw_devices(cfg, 1, "client-device", np.arange(2000), 1)
    rgb = draw_devices(cfg, 1, "client-device", np.arange(2000), 3)
    assert gray.gain.shape == (2000, 1)
    assert abs(np.median(gray.gain) - 1.0) < 0.02
    assert np.array_equal(gray.brightness, rgb.brightness) and np.array_equal(gray.contrast, rgb.contrast)


# ---------------------------------------------------------------- intensity


def test_gain_scales_each_channel_mean():
    x = images(low=60, high=140)
    out = shifted(x, color=(1.5, 1.0, 0.5))
    assert np.allclose(channel_means(out), channel_means(x) * [1.5, 1.0, 0.5], atol=0.6)


def test_brightness_shifts_the_mean():
    x = images(low=60, high=140)
    assert np.allclose(channel_means(shifted(x, brightness=0.1)) - channel_means(x), 25.5, atol=0.6)
    assert np.allclose(channel_means(shifted(x, brightness=-0.2)) - channel_means(x), -51.0, atol=0.6)


def test_contrast_stretches_about_each_images_own_mean():
    x = images(low=70, high=130)
    x[: len(x) // 2] += 40  # images with different means: the pivot must be per image
    out = shifted(x, contrast=1.5).astype(np.float64)
    xf = x.astype(np.float64)
    assert np.allclose(out.mean(axis=(1, 2, 3)), xf.mean(axis=(1, 2, 3)), atol=0.6)
    assert np.allclose(out.std(axis=(1, 2, 3)), 1.5 * xf.std(axis=(1, 2, 3)), rtol=0.02)
    flat = shifted(x, contrast=0.5).astype(np.float64)
    assert np.allclose(flat.std(axis=(1, 2, 3)), 0.5 * xf.std(axis=(1, 2, 3)), rtol=0.03)


# ---------------------------------------------------------------- spatial


def test_blur_matches_a_reflect_padded_gaussian_and_removes_high_frequencies():
    x = images(n=8)
    out = shifted(x, blur=1.0)
    assert high_freq_energy(out) < 0.2 * high_freq_energy(x)
    # scipy's "mirror" is torch's "reflect"; truncate=3 gives the same 3-sigma radius
    ref = gaussian_filter(x.astype(np.float64), sigma=(0, 1.0, 1.0, 0), mode="mirror", truncate=3.0)
    assert np.abs(out - np.rint(ref)).max() <= 1
    assert np.allclose(channel_means(out), channel_means(x), atol=1.0)


def test_stronger_blur_removes_more():
    x = images(n=8)
    assert high_freq_energy(shifted(x, blur=2.0)) < high_freq_energy(shifted(x, blur=0.7))


def test_downsample_makes_constant_blocks_of_block_means():
    x = images(n=8)
    out = shifted(x, downsample=4).astype(np.float64)
    blocks = out.reshape(8, 7, 4, 7, 4, 3)
    assert np.all(blocks == blocks[:, :, :1, :, :1, :])
    means = x.astype(np.float64).reshape(8, 7, 4, 7, 4, 3).mean(axis=(2, 4))
    assert np.abs(blocks[:, :, 0, :, 0, :] - means).max() <= 0.5


def test_downsample_by_a_non_divisor_still_reduces_detail():
    x = images(n=8)
    out = shifted(x, downsample=3)
    assert out.shape == x.shape
    assert high_freq_energy(out) < 0.6 * high_freq_energy(x)


# ---------------------------------------------------------------- noise


def test_noise_has_the_configured_std_and_is_seeded():
    x = np.full((200, 28, 28, 3), 128, dtype=np.uint8)
    out = shifted(x, noise=0.05, noise_seed=11)
    diff = out.astype(np.float64) - 128
    assert abs(diff.mean()) < 0.1
    assert abs(diff.std() - np.sqrt((0.05 * 255) ** 2 + 1 / 12)) < 0.1  # plus rounding's variance
    assert np.array_equal(out, shifted(x, noise=0.05, noise_seed=11))
    assert not np.array_equal(out, shifted(x, noise=0.05, noise_seed=12))


def test_output_is_clipped_to_the_image_range():
    x = images(n=16)
    out = shifted(x, brightness=0.5, noise=0.2)
    assert out.dtype == np.uint8
    assert (out == 255).mean() > 0.5 and out.min() < 255


# ---------------------------------------------------------------- batches and inputs


def test_large_batches_match_small_ones():
    x = images(n=9000, size=8)  # more than one internal chunk
    cfg = ShiftConfig(
        color=(1.1, 0.9, 1.0), color_jitter=0.1, contrast=1.2, jitter=0.1, blur=0.8, downsample=2
    )
    d = draw_devices(cfg, 0, "client-device", np.arange(9000), 3)
    whole = apply_shift(x, cfg, d, 0)
    tail = apply_shift(x[8500:], cfg, Devices(d.gain[8500:], d.brightness[8500:], d.contrast[8500:]), 0)
    assert np.array_equal(whole[8500:], tail)


def test_per_image_devices_differ():
    x = np.full((2, 8, 8, 3), 100, dtype=np.uint8)
    cfg = ShiftConfig(brightness=0.0, jitter=0.2)
    d = Devices(np.ones((2, 3), np.float32), np.array([0.2, -0.2], np.float32), np.ones(2, np.float32))
    out = apply_shift(x, cfg, d, 0)
    assert np.all(out[0] == 151) and np.all(out[1] == 49)


def test_grayscale_images():
    x = images(channels=1, low=60, high=140)
    out = shifted(x, color=(1.4, 1.2, 1.0), blur=0.5, noise=0.01)
    assert out.shape == x.shape and out.dtype == np.uint8
    assert abs(channel_means(out)[0] - 1.2 * channel_means(x)[0]) < 1.0


def test_read_only_input():
    x = images()
    expected = shifted(x, brightness=0.1, blur=1.0)
    x.flags.writeable = False
    assert np.array_equal(shifted(x, brightness=0.1, blur=1.0), expected)


def test_devices_must_match_the_batch():
    cfg = ShiftConfig(brightness=0.1)
    with pytest.raises(ValueError, match="devices"):
        apply_shift(images(n=4), cfg, draw_devices(cfg, 0, "client-device", np.arange(3), 3), 0)
    with pytest.raises(ValueError, match="devices"):
        apply_shift(images(n=4), cfg, draw_devices(cfg, 0, "client-device", np.arange(4), 1), 0)
