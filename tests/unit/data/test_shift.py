"""The shift suite: determinism, shape/dtype/range, distortion strictly growing with severity, cache."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from fallbackformer.data import shift
from fallbackformer.data.shift import (
    CORRUPTIONS,
    HELD_OUT,
    SEVERITIES,
    STOCHASTIC,
    TUNING_CORRUPTIONS,
    ShiftSuite,
    corrupt,
    make_shift_sets,
    parse_set_key,
    tuning_sets,
)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images[:400], dtype=torch.float32)[:, None]  # [400, 1, 8, 8] in 0..16
    y = torch.tensor(d.target[:400], dtype=torch.long)
    return x, y


def test_suite_size() -> None:
    assert len(TUNING_CORRUPTIONS) >= 12
    assert len(HELD_OUT) >= 3
    assert not set(TUNING_CORRUPTIONS) & HELD_OUT
    assert set(CORRUPTIONS) == set(TUNING_CORRUPTIONS) | HELD_OUT


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_contract(name: str, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = digits
    x_before = x.clone()
    distortion = []
    for s in SEVERITIES:
        y = corrupt(x, name, s, seed=7)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y).all()
        assert y.min() >= 0.0 and y.max() <= 16.0
        assert torch.equal(y, corrupt(x, name, s, seed=7)), f"{name}/{s} is not deterministic"
        distortion.append((y - x).flatten(1).norm(dim=1).mean().item())  # mean L2 per image
    assert torch.equal(x, x_before), f"{name} modified its input in place"
    assert all(a < b for a, b in zip(distortion, distortion[1:])), f"{name}: {distortion} not strictly increasing"
    assert distortion[0] > 0.0
    if name in STOCHASTIC:
        assert not torch.equal(corrupt(x, name, 3, seed=7), corrupt(x, name, 3, seed=8)), f"{name} ignores the seed"
        assert not torch.equal(corrupt(x, name, 3, seed=7), corrupt(x, name, 2, seed=7))


@pytest.mark.parametrize("name", ["gaussian_noise", "rotate", "pixelate", "zigzag", "shot_noise"])
def test_float64_and_global_rng_untouched(name: str, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x = digits[0][:16].double()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    y = corrupt(x, name, 4, seed=1)
    assert torch.equal(torch.get_rng_state(), before), "a corruption consumed the global RNG"
    assert y.dtype == torch.float64 and y.shape == x.shape
    # float32 and float64 agree up to precision (same draws)
    assert torch.allclose(y.float(), corrupt(x.float(), name, 4, seed=1), atol=1e-3)


def test_errors(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = digits
    with pytest.raises(KeyError, match="nope.*gaussian_noise"):
        corrupt(x, "nope", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "rotate", 6)
    with pytest.raises(ValueError, match="floating"):
        corrupt(x.long(), "rotate", 1)
    with pytest.raises(ValueError, match="4-D"):
        corrupt(x[:, 0], "rotate", 1)
    assert corrupt(x[:0], "rotate", 1).shape == (0, 1, 8, 8)


def test_make_shift_sets_and_cache(tmp_path, digits: tuple[torch.Tensor, torch.Tensor], monkeypatch) -> None:
    x, y = digits[0][:32], digits[1][:32]
    names = ["rotate", "fog"]
    sets = make_shift_sets(x, y, names, (1, 3), seed=3, cache_dir=tmp_path)
    assert list(sets) == ["rotate/1", "rotate/3", "fog/1", "fog/3"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    for key, (xs, ys) in sets.items():
        name, sev = parse_set_key(key)
        assert torch.equal(xs, corrupt(x, name, sev, seed=3)) and torch.equal(ys, y)

    calls = []
    real = shift.corrupt
    monkeypatch.setattr(shift, "corrupt", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = make_shift_sets(x, y, names, (1, 3), seed=3, cache_dir=tmp_path)
    assert not calls, "cached sets were recomputed"
    assert all(torch.equal(again[k][0], sets[k][0]) for k in sets)
    make_shift_sets(x, y, ["rotate"], (1,), seed=4, cache_dir=tmp_path)  # a new seed is a new key
    make_shift_sets(x + 0.5, y, ["rotate"], (1,), seed=3, cache_dir=tmp_path)  # a new input too
    assert len(calls) == 2
    # a torn cache file is recomputed, not trusted
    victim = sorted(tmp_path.glob("rotate_s1_seed3*.safetensors"))[0]
    victim.write_bytes(b"garbage")
    fixed = make_shift_sets(x, y, ["rotate"], (1,), seed=3, cache_dir=tmp_path)
    assert torch.equal(fixed["rotate/1"][0], sets["rotate/1"][0])


def test_suite_config() -> None:
    suite = ShiftSuite(names=["rotate", "contrast"], held_out=["fog"], severities=[1, 2], seed=0)
    assert suite.all_names == ["rotate", "contrast", "fog"]
    assert suite.is_held_out("fog/2") and not suite.is_held_out("rotate/1")
    x = torch.rand(4, 1, 8, 8) * 16
    sets = suite.build(x, torch.zeros(4, dtype=torch.long))
    assert len(sets) == 6
    assert list(tuning_sets(sets)) == ["rotate/1", "rotate/2", "contrast/1", "contrast/2"]
    assert len(suite.build(x, torch.zeros(4, dtype=torch.long), include_held_out=False)) == 4
    with pytest.raises(ValueError, match="both tunable and held out"):
        ShiftSuite(names=["fog"], held_out=["fog"])
    assert parse_set_key("clean") is None
