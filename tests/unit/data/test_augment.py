"""AugMix over the tunable corruptions: determinism, shapes and range, held-out names refused."""

from __future__ import annotations

import pytest
import torch

from fallbackformer.data.augment import AugMix, AugMixConfig, NoAugmentation, optional_augmentation
from fallbackformer.data.shift import HELD_OUT, TUNING_CORRUPTIONS


def _images(n: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 16  # [N, 1, 8, 8] in 0..16


def test_same_seed_same_views_and_other_seed_differs():
    x = _images()
    a, b = AugMix(AugMixConfig(seed=3)), AugMix(AugMixConfig(seed=3))
    va, vb = a.views(x, 2), b.views(x, 2)
    assert all(torch.equal(p, q) for p, q in zip(va, vb))
    assert not torch.equal(va[0], va[1])  # two independent views
    assert not torch.equal(va[0], AugMix(AugMixConfig(seed=4))(x))
    a.reset()
    assert torch.equal(a.views(x, 2)[0], va[0])  # reset re-seeds
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(a(x, generator=g1), b(x, generator=g2))  # an explicit generator decides alone


def test_shape_dtype_range_and_global_rng_untouched():
    x = _images(20)
    state = torch.random.get_rng_state()
    for out in AugMix(AugMixConfig(seed=0)).views(x, 3):
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= 0.0 and float(out.max()) <= 16.0
        assert torch.isfinite(out).all()
    assert torch.equal(state, torch.random.get_rng_state())
    assert AugMix()(x[:0]).shape == (0, 1, 8, 8)


def test_every_setting_and_every_single_operation_runs():
    x = _images(8)
    for op in TUNING_CORRUPTIONS:
        cfg = AugMixConfig(operations=[op], width=2, depth_min=1, depth_max=2, severity_min=5, severity_max=5)
        out = AugMix(cfg)(x)
        assert out.shape == x.shape and 0.0 <= float(out.min()) <= float(out.max()) <= 16.0, op


def test_identity_like_operation_keeps_the_image():
    x = _images(6)
    # brightness at severity 1 adds 1.6 everywhere: the output lies between x and x + 1.6 (clamped)
    out = AugMix(AugMixConfig(operations=["brightness"], depth_max=1, severity_max=1))(x)
    assert (out >= x - 1e-5).all() and (out <= (x + 1.6).clamp(max=16) + 1e-5).all()


@pytest.mark.parametrize("name", sorted(HELD_OUT))
def test_held_out_corruptions_are_refused(name):
    with pytest.raises(ValueError, match="HELD-OUT") as info:
        AugMix(AugMixConfig(operations=["rotate", name]))
    assert name in str(info.value) and "gaussian_noise" in str(info.value)


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="not_a_corruption"):
        AugMix(AugMixConfig(operations=["not_a_corruption"]))
    with pytest.raises(ValueError, match="depth_min"):
        AugMixConfig(depth_min=3, depth_max=2)
    with pytest.raises(ValueError, match="severity"):
        AugMixConfig(severity_max=6)
    with pytest.raises(ValueError, match="alpha"):
        AugMixConfig(alpha=0.0)
    with pytest.raises(ValueError, match="batch"):
        AugMix()(torch.zeros(8))


def test_optional_augmentation():
    aug = AugMix()
    assert optional_augmentation(aug) is aug
    assert optional_augmentation(NoAugmentation()) is None and optional_augmentation(None) is None
    with pytest.raises(TypeError, match="_target_"):
        optional_augmentation(object())
