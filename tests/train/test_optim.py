import math

import pytest
import torch
from torch import nn

from train.config import OptimConfig
from train.optim import build_optimizer, class_weights, lr_at, param_groups


def _lrs(schedule, total=100, warmup=10, base=1.0, min_ratio=0.01):
    return [lr_at(s, total_steps=total, warmup_steps=warmup, base_lr=base, schedule=schedule, min_lr_ratio=min_ratio)
            for s in range(total)]


def test_cosine_warmup_then_decay_to_min():
    lrs = _lrs("cosine")
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up reaches the peak
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # monotone decay afterwards
    assert lr_at(100, total_steps=100, warmup_steps=10, base_lr=1.0, schedule="cosine", min_lr_ratio=0.01) \
        == pytest.approx(0.01)
    mid = 10 + 45
    assert lrs[mid] == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * 0.5)))


def test_onecycle_starts_low_and_constant_is_flat():
    one = _lrs("onecycle")
    assert one[0] == pytest.approx(1.0 / 25) and max(one) == pytest.approx(1.0, rel=0.02)
    const = _lrs("constant")
    assert const[10:] == [1.0] * 90


def test_no_decay_on_norm_and_bias_by_shape():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2, 4}  # conv kernel and linear weight
    assert len(no_decay["params"]) == 4  # conv bias, BN weight, BN bias, linear bias
    opt = build_optimizer(model, OptimConfig())
    assert isinstance(opt, torch.optim.AdamW)
    assert isinstance(build_optimizer(model, OptimConfig(name="adam")), torch.optim.Adam)


def test_balanced_class_weights():
    w = class_weights({"NORMAL": 25, "PNEUMONIA": 75}, ["NORMAL", "PNEUMONIA"], "balanced")
    assert w.tolist() == pytest.approx([2.0, 2.0 / 3.0])
    # Equal total weight per class.
    assert 25 * w[0].item() == pytest.approx(75 * w[1].item())
    assert class_weights({"NORMAL": 1, "PNEUMONIA": 3}, ["NORMAL", "PNEUMONIA"], "none") is None
    with pytest.raises(ValueError, match="every class"):
        class_weights({"NORMAL": 0, "PNEUMONIA": 3}, ["NORMAL", "PNEUMONIA"], "balanced")
