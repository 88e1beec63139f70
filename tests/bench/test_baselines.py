"""The benchmark's baselines compute what they claim: the reference SNELLA equals the library's math,
and GPS-style tuning only moves the masked entries."""

import torch
from torch import nn

from snella import functional as Fn
from snella.bench.baselines import ReferenceSnellaLinear, apply_gps_style
from snella.ops import DeltaSpec


def test_reference_update_equals_library_update():
    torch.manual_seed(0)
    layer = ReferenceSnellaLinear(nn.Linear(12, 36), r=8, sparsity=0.7, split=True)
    with torch.no_grad():
        layer.alpha.uniform_(0.5, 1.5)
        layer.beta.uniform_(-0.1, 0.1)
    ref = layer._delta(layer.A, layer.B, layer.alpha, layer.gamma, layer.beta)  # (36, 12), cdist + quantile
    ours, _ = DeltaSpec("mixed", "magnitude", (0.7, 0.7, 0.7)).delta(
        layer.A, layer.B, Fn.chunk_coefficients(2), layer.alpha, layer.gamma, layer.beta)
    torch.testing.assert_close(ref, ours.reshape(36, 12), rtol=1e-5, atol=1e-8)


def test_gps_style_updates_only_masked_entries():
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].mlp = nn.Module()
    model.blocks[0].mlp.fc1 = nn.Linear(20, 30)
    names = apply_gps_style(model, density=0.2)
    assert names == ["blocks.0.mlp.fc1"]
    weight = model.blocks[0].mlp.fc1.weight
    before = weight.detach().clone()
    opt = torch.optim.SGD([weight], lr=0.1)
    model.blocks[0].mlp.fc1(torch.randn(4, 20)).pow(2).sum().backward()
    opt.step()
    moved = (weight.detach() != before).float().mean().item()
    assert 0.1 < moved < 0.3  # about the mask's density, far from all entries
