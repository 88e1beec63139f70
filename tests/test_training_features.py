"""Training features users turn on: timm's gradient checkpointing and torch.compile must give the
gradients of a plain eager run."""

from __future__ import annotations

import copy

import pytest
import torch

from snella import SnellaConfig, get_snella_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=48, num_heads=3, num_classes=5)
    return get_snella_model(model, SnellaConfig(r=8, sparsity=0.5, modules_to_save=["head"]))


def factor_grads(model, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient of every snella factor after one cross-entropy backward."""
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), target).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "snella_" in n and p.grad is not None}


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)


def test_gradient_checkpointing_gives_the_plain_gradients():
    """timm's ``set_grad_checkpointing`` (non-reentrant, timm's default): forward is re-run in backward
    under saved-tensor hooks that allow one unpack of each Function's saved tensors."""
    model = tiny_vit().train()
    x, y = batch()
    plain = factor_grads(model, x, y)
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    got = factor_grads(checkpointed, x, y)
    assert plain.keys() == got.keys() and len(plain) == 2 * 2 * 4 + 2 * 3 * 4  # A, B and 3 scalars of 8 layers
    for name in plain:
        torch.testing.assert_close(got[name], plain[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.slow  # over 10 s: `-m "not slow"` skips it in a quick loop; CI runs it
def test_torch_compile_gives_the_eager_gradients():
    """inductor compiles the model around the adapted layers (ops.adapted_op is not traced): the factor
    gradients are the eager ones, at sparsity > 0 where a traced forward flipped entries of the mask."""
    model = tiny_vit().train()
    x, y = batch()
    eager = factor_grads(model, x, y)
    compiled = torch.compile(copy.deepcopy(model))
    got = factor_grads(compiled, x, y)
    assert len(got) == len(eager)
    for name in eager:
        torch.testing.assert_close(got["_orig_mod." + name], eager[name], rtol=1e-5, atol=1e-9, msg=name)
