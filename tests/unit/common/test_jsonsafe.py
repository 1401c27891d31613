"""The one JSON form: exact output for NaN, infinities, tensors, numpy values and nested containers."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fallbackformer.common.jsonsafe import dumps, json_float, json_safe, parse_json_float


def test_floats_exactly():
    assert json_safe(float("nan")) is None
    assert json_safe(float("inf")) == "inf"
    assert json_safe(float("-inf")) == "-inf"
    assert json_safe(0.25) == 0.25 and json_safe(-0.0) == 0.0
    assert [json_float(v) for v in (None, 1e300, math.nan, math.inf, -math.inf)] == [None, 1e300, None, "inf", "-inf"]


def test_scalars_keep_their_python_type():
    for value in (None, True, False, 0, -7, "nan", "x"):
        assert json_safe(value) == value and type(json_safe(value)) is type(value)


def test_tensors_and_numpy():
    assert json_safe(torch.tensor(2.5)) == 2.5
    assert json_safe(torch.tensor(float("inf"))) == "inf"
    assert json_safe(torch.tensor([[1.0, float("nan")], [float("-inf"), 0.5]])) == [[1.0, None], ["-inf", 0.5]]
    assert json_safe(torch.tensor([1, 2], dtype=torch.long)) == [1, 2]
    assert json_safe(torch.tensor([True, False])) == [True, False]
    assert json_safe(np.float32(0.5)) == 0.5 and type(json_safe(np.float32(0.5))) is float
    assert json_safe(np.float64("nan")) is None and json_safe(np.float64("-inf")) == "-inf"
    assert json_safe(np.int64(3)) == 3 and type(json_safe(np.int64(3))) is int
    assert json_safe(np.bool_(True)) is True
    assert json_safe(np.array([1.0, np.inf])) == [1.0, "inf"]


def test_nested_containers():
    @dataclasses.dataclass
    class Point:
        x: float
        tags: tuple[str, ...]

    obj = {
        "a": (1, [float("nan"), {"b": float("inf")}]),
        3: Point(float("-inf"), ("u", "v")),
        ("k", 1): Path("/tmp/x"),
        "t": {"z": torch.tensor([0.0])},
    }
    assert json_safe(obj) == {
        "a": [1, [None, {"b": "inf"}]],
        3: {"x": "-inf", "tags": ["u", "v"]},
        "('k', 1)": "/tmp/x",
        "t": {"z": [0.0]},
    }
    text = dumps(obj, sort_keys=False)
    assert json.loads(text) == {"a": [1, [None, {"b": "inf"}]], "3": {"x": "-inf", "tags": ["u", "v"]},
                                "('k', 1)": "/tmp/x", "t": {"z": [0.0]}}
    assert dumps({"b": 1, "a": float("nan")}, sort_keys=True) == '{"a": null, "b": 1}'


def test_the_input_is_not_modified():
    obj = {"a": [float("nan")]}
    json_safe(obj)
    assert math.isnan(obj["a"][0])


def test_refuses_what_json_cannot_hold_and_says_where():
    with pytest.raises(TypeError, match=r"policy\.hooks\[1\] holds a object"):
        json_safe({"hooks": [1, object()]}, where="policy")


def test_parse_back():
    for value in (0.5, math.inf, -math.inf, 3):
        assert parse_json_float(json.loads(dumps(value))) == value
    assert math.isnan(parse_json_float(json.loads(dumps(math.nan))))
    assert math.isnan(parse_json_float("nan"))  # what bundles of format 1 and 2 wrote
    assert parse_json_float(None, missing=math.inf) == math.inf
    for bad in ("Infinity", "1e3x", True):
        with pytest.raises(ValueError):
            parse_json_float(bad)
