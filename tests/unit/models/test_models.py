"""MultiExitNet, the registry and the digits reference models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fallbackformer as ff
from fallbackformer.models.transforms import Resize, ScaleShift


def test_registry_builds_records_and_names_unknown_models():
    model = ff.create_model("digits_cnn_exits", num_classes=7, width=8)
    assert model.registry_name == "digits_cnn_exits"
    assert model.registry_kwargs == {"num_classes": 7, "width": 8}
    assert {"digits_cnn_exits", "digits_mlp_student"} <= set(ff.list_models())
    with pytest.raises(KeyError, match="unknown model 'nope'.*digits_cnn_exits.*register_model"):
        ff.create_model("nope")


def test_register_model_refuses_a_second_builder_for_a_name():
    @ff.register_model("test_tiny_student")
    def tiny(num_classes: int = 3) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    assert ff.create_model("test_tiny_student")(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="already registered"):
        ff.register_model("test_tiny_student")(lambda: nn.Identity())


def test_digits_models_read_the_raw_input_and_exit_in_order():
    torch.manual_seed(0)
    primary = ff.create_model("digits_cnn_exits")
    student = ff.create_model("digits_mlp_student")
    x = torch.rand(5, 1, 8, 8) * 16
    logits = primary(x)
    assert primary.exit_names == ["exit_1", "exit_2", "exit_3", "primary"]
    assert [tuple(t.shape) for t in logits] == [(5, 10)] * 4
    assert student(x).shape == (5, 10)
    # forward == forward_head(forward_features) (the timm split)
    for a, b in zip(logits, primary.forward_head(primary.forward_features(x))):
        torch.testing.assert_close(a, b)
    # the student is much cheaper than the primary
    n_primary = sum(p.numel() for p in primary.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    assert n_student < n_primary / 2


def test_the_cnn_student_reads_the_raw_input_at_a_small_fraction_of_the_primarys_flops():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    primary, student = ff.create_model("digits_cnn_exits").eval(), ff.create_model("digits_cnn_student").eval()
    x = torch.rand(5, 1, 8, 8) * 16
    assert student(x).shape == (5, 10) and "digits_cnn_student" in ff.list_models()

    def count(m):
        with FlopCounterMode(display=False) as fc:
            m(x[:1])
        return fc.get_total_flops()

    assert count(student) == 168448 and count(primary) == 2492672  # 6.8% of the primary's FLOPs at width 16


def test_transforms_are_part_of_the_model():
    t = ScaleShift(16.0, mean=0.5, std=0.25)
    torch.testing.assert_close(t(torch.tensor([0.0, 8.0, 16.0])), torch.tensor([-2.0, 0.0, 2.0]))
    assert Resize(16)(torch.zeros(2, 1, 8, 8)).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="positive"):
        ScaleShift(0.0)
    primary = ff.create_model("digits_cnn_exits")
    assert isinstance(primary.input_transform, nn.Sequential)


def test_multi_exit_net_runs_a_user_model_with_one_exit():
    net = ff.MultiExitNet([nn.Linear(4, 4)], {0: nn.Linear(4, 2)})
    assert net.exit_names == ["primary"] and net.num_exits == 1
    assert net(torch.zeros(3, 4))[0].shape == (3, 2)
    with pytest.raises(ValueError, match="at least one stage"):
        ff.MultiExitNet([], {0: nn.Identity()})
