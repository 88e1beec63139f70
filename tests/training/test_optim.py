"""Tests of the optimiser set-up: decay groups and the warm-up + cosine schedule."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from snella.training.optim import build_optimizer, build_scheduler, cosine_lr, param_groups


def test_cosine_lr_end_points_and_shape():
    kw = dict(total_steps=100, warmup_steps=10, lr=1e-2, warmup_lr=1e-6, min_lr=1e-5)
    assert cosine_lr(0, **kw) == 1e-6
    assert cosine_lr(5, **kw) == pytest.approx(1e-6 + (1e-2 - 1e-6) / 2)
    assert cosine_lr(10, **kw) == pytest.approx(1e-2)
    assert cosine_lr(55, **kw) == pytest.approx((1e-2 + 1e-5) / 2)  # half way down the cosine
    assert cosine_lr(100, **kw) == pytest.approx(1e-5)
    assert cosine_lr(150, **kw) == pytest.approx(1e-5)  # the floor holds past the end
    decay = [cosine_lr(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert cosine_lr(0, 10, 0, 1.0, 0.0, 0.0) == 1.0  # no warm-up: starts at the peak


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


def test_no_decay_on_1d_parameters_and_tokens():
    model = Tiny()
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.fc.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model.cls_token), id(model.fc.bias), id(model.norm.weight),
                                                   id(model.norm.bias)}
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(Tiny().requires_grad_(False), 0.1)


def test_scheduler_follows_cosine_lr_and_its_state_reloads_safely():
    model = Tiny()
    opt = build_optimizer(model, lr=0.1, weight_decay=0.0)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=4, lr=0.1, warmup_lr=0.001, min_lr=0.002)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([cosine_lr(s, 20, 4, 0.1, 0.001, 0.002) for s in range(12)])
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    opt2 = build_optimizer(Tiny(), lr=0.1, weight_decay=0.0)
    sched2 = build_scheduler(opt2, total_steps=20, warmup_steps=4, lr=0.1, warmup_lr=0.001, min_lr=0.002)
    sched2.load_state_dict(torch.load(buf, weights_only=True))
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(cosine_lr(13, 20, 4, 0.1, 0.001, 0.002))
    assert math.isclose(sched.get_last_lr()[0], cosine_lr(12, 20, 4, 0.1, 0.001, 0.002))
