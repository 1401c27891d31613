"""The JSD consistency loss against a brute-force formula; a training step with AugMix; the criterion."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import fallbackformer as ff
from fallbackformer.data.augment import AugMix, AugMixConfig
from fallbackformer.training.distill_module import DistillModule
from fallbackformer.training.multi_exit_module import MultiExitModule
from fallbackformer.training.robust import jensen_shannon, tuning_robustness


def _brute_force_jsd(a, b, c):
    """JS = H(mean of p) - mean of H(p), per sample, averaged (equals the mean KL to the mixture)."""
    total = 0.0
    for i in range(a.shape[0]):
        ps = [[math.exp(v) for v in row[i].tolist()] for row in (a, b, c)]
        ps = [[v / sum(p) for v in p] for p in ps]
        m = [sum(p[k] for p in ps) / 3 for k in range(len(ps[0]))]
        entropy = lambda q: -sum(v * math.log(v) for v in q if v > 0)  # noqa: E731
        total += entropy(m) - sum(entropy(p) for p in ps) / 3
    return total / a.shape[0]


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_jensen_shannon_matches_the_formula(scale):
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(7, 5, generator=g, dtype=torch.float64) * scale for _ in range(3))
    assert float(jensen_shannon(a, b, c)) == pytest.approx(_brute_force_jsd(a, b, c), rel=1e-6, abs=1e-9)


def test_jensen_shannon_is_zero_for_equal_views_and_bounded():
    x = torch.randn(4, 3)
    assert float(jensen_shannon(x, x.clone(), x.clone())) == pytest.approx(0.0, abs=1e-6)
    far = torch.eye(3) * 50
    assert float(jensen_shannon(far, far.roll(1, 0), far.roll(2, 0))) <= math.log(3) + 1e-4
    with pytest.raises(ValueError, match="one shape"):
        jensen_shannon(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4))


def _batch(n=32):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g) * 16, torch.randint(0, 10, (n,), generator=g)


def test_a_multi_exit_training_step_with_augmix_runs_and_lowers_the_loss():
    torch.manual_seed(0)
    model = ff.create_model("digits_cnn_exits", num_classes=10, width=4, image_size=8)
    aug = AugMix(AugMixConfig(seed=0, lambda_jsd=1.0))
    module = MultiExitModule(model, functools.partial(torch.optim.Adam), num_classes=10, augment=aug)
    losses = []
    x, y = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    module.log = lambda *a, **k: None
    for i in range(6):
        aug.reset()  # the same views every step, so the loss falls only through learning
        opt.zero_grad()
        loss = module.training_step((x, y), i)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_a_distill_step_with_augmix_runs_and_lowers_the_loss():
    torch.manual_seed(0)
    teacher = ff.create_model("digits_cnn_exits", num_classes=10, width=4, image_size=8)
    student = ff.create_model("digits_mlp_student", num_classes=10, hidden=16)
    aug = AugMix(AugMixConfig(seed=0, lambda_jsd=1.0))
    module = DistillModule(student, teacher, functools.partial(torch.optim.Adam), num_classes=10, augment=aug)
    x, y = _batch()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    module.log = lambda *a, **k: None
    losses = []
    for i in range(6):
        aug.reset()  # the same views every step, so the loss falls only through learning
        opt.zero_grad()
        loss = module.training_step((x, y), i)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(not p.requires_grad for p in teacher.parameters())


def test_augmentation_is_off_by_default():
    model = ff.create_model("digits_cnn_exits", num_classes=10, width=4, image_size=8)
    assert MultiExitModule(model, functools.partial(torch.optim.Adam), num_classes=10).augment is None


def test_tuning_robustness_scores_both_models_and_refuses_held_out():
    torch.manual_seed(0)
    primary = ff.create_model("digits_cnn_exits", num_classes=10, width=4, image_size=8)
    student = ff.create_model("digits_mlp_student", num_classes=10, hidden=16)
    x, y = _batch(16)
    out = tuning_robustness({"primary": primary, "student": student}, x, y, names=["rotate", "contrast"],
                            severities=[1, 5])
    assert set(out) == {"primary", "student"}
    for r in out.values():
        assert set(r) == {"clean", "tunable", "worst"} and all(0.0 <= v <= 1.0 for v in r.values())
    with pytest.raises(ValueError, match="held-out"):
        tuning_robustness({"primary": primary}, x, y, names=["rotate", "fog"])


def test_lambda_views_adds_the_supervised_loss_on_the_two_views():
    """Primary: + lambda_views * mean exit CE on (aug1, aug2); student: + lambda_views * mean Hinton loss on them."""
    from fallbackformer.training.distill_module import hinton_loss

    torch.manual_seed(0)
    model = ff.create_model("digits_cnn_exits", num_classes=10, width=4, image_size=8).eval()
    student = ff.create_model("digits_cnn_student", num_classes=10, width=4).eval()
    x, y = _batch(8)
    losses = {}
    for lv in (0.0, 0.5):
        aug = AugMix(AugMixConfig(seed=0, lambda_jsd=1.0, lambda_views=lv))
        primary_module = MultiExitModule(model, functools.partial(torch.optim.Adam), num_classes=10, augment=aug)
        distill_module = DistillModule(student, model, functools.partial(torch.optim.Adam), num_classes=10, augment=aug)
        primary_module.log = distill_module.log = lambda *a, **k: None
        aug.reset()
        p = float(primary_module.training_step((x, y), 0).detach())
        aug.reset()
        s = float(distill_module.training_step((x, y), 0).detach())
        losses[lv] = (p, s)
    aug.reset()
    v1, v2 = aug.views(x, 2)
    with torch.no_grad():
        ce = [primary_module.exit_loss(model(v), y) for v in (v1, v2)]
        teacher = model(x)[-1]
        hl = [hinton_loss(student(v), teacher, y, 4.0, 0.7) for v in (v1, v2)]
    assert losses[0.5][0] == pytest.approx(losses[0.0][0] + 0.5 * float(sum(ce)) / 2, rel=1e-5)
    assert losses[0.5][1] == pytest.approx(losses[0.0][1] + 0.5 * float(sum(hl)) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="lambda_views"):
        AugMixConfig(lambda_views=-1.0)
