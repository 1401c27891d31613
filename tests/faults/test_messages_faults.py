"""Issue 12, messages: a meta tensor is refused up front; a float64 value beyond float32's range is
reported as an overflow, not as "NaN or inf"."""

from __future__ import annotations

import pytest
import torch

import fallbackformer as ff
from fallbackformer.runtime.validation import InvalidInputError, bad_samples, check_batch, describe_bad_samples

SPEC = ff.InputSpec(shape=(1, 8, 8), dtype="float32", value_range=(0.0, 16.0))


@pytest.fixture
def model(make_model):
    return make_model(0)


def test_a_meta_tensor_is_refused_naming_the_device(model):
    x = torch.empty(2, 1, 8, 8, device="meta")
    with pytest.raises(InvalidInputError, match=r"meta device.*device='cpu'"):
        model(x)
    with pytest.raises(InvalidInputError, match=r"meta device"):
        check_batch(torch.empty(2, 3, device="meta"), None)


def test_a_float64_value_beyond_float32_is_reported_as_an_overflow(model):
    x = torch.full((2, 1, 8, 8), 3.0, dtype=torch.float64)
    x[1, 0, 0, 0] = 1e39
    model.policy = ff.Policy(budget_ms=1e6, on_invalid_input="raise")
    with pytest.raises(InvalidInputError) as info:
        model(x)
    msg = str(info.value)
    assert "NaN" not in msg and "sample 1" in msg
    assert "1e+39" in msg and "float32" in msg and "overflow" in msg


def test_a_real_inf_is_still_called_inf():
    x = torch.full((1, 1, 8, 8), 3.0, dtype=torch.float64)
    x[0, 0, 0, 0] = float("inf")
    y = check_batch(x, SPEC)
    assert "NaN or inf" in describe_bad_samples(y, bad_samples(y, SPEC), SPEC)
