"""Shared fixtures: tiny seeded models of every supported family, their inputs, a short training loop, and
Fashion-MNIST (skipped where it is missing, except in CI, where its absence fails)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from torch import nn

# tests/spec_reference.py (independent transcriptions of SPEC.md) is imported by name from the tests.
sys.path.insert(0, str(Path(__file__).parent))
from support import missing  # noqa: E402  (tests/ on sys.path first)

# Without a GPU, the Triton passes (snella/gpu/) run through triton's interpreter (tests/test_triton.py).
# Triton reads the switch when a kernel is defined, so it is set here, before any test module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# family -> (timm name, kwargs, input side). Shrunk to 20k-600k parameters so a training step takes
# milliseconds; ConvNeXt's layer scale and EVA's head start at 1 (their defaults, 1e-6 and 1e-3, would
# hide any adapter's effect on the output); all randomly initialised (pretrained=False works offline).
_TIMM_SPECS: dict[str, tuple[str, dict, int]] = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=5), 32),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=32, window_size=4, depths=(1, 1), num_heads=(2, 4), embed_dim=16, num_classes=5), 32),
    "convnext": ("convnext_atto", dict(dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), ls_init_value=1.0, num_classes=5), 32),
    "mobilenet": ("mobilenetv3_small_050", dict(num_classes=5), 32),
    "eva": ("eva02_tiny_patch14_224", dict(img_size=28, depth=2, embed_dim=48, num_heads=3, num_classes=5, head_init_scale=1.0), 28),
}


class TinyModels:
    """Builds tiny seeded models and runs them; one instance per test (the ``tiny`` fixture)."""

    def model(self, family: str, seed: int = 0) -> nn.Module:
        """A freshly initialised model of ``family`` in eval mode; the same seed gives the same weights."""
        torch.manual_seed(seed)
        if family == "hf_vit":
            from transformers import ViTConfig, ViTForImageClassification

            config = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64, num_labels=5)
            return ViTForImageClassification(config).eval()
        import timm

        name, kwargs, _ = _TIMM_SPECS[family]
        return timm.create_model(name, pretrained=False, **kwargs).eval()

    def inputs(self, family: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
        """A seeded image batch ``(batch, 3, H, W)`` of the size ``family``'s tiny model takes."""
        side = 16 if family == "hf_vit" else _TIMM_SPECS[family][2]
        return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))

    @staticmethod
    def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's class scores ``(batch, classes)`` (unwraps a Hugging Face output object)."""
        out = model(x)
        return out.logits if hasattr(out, "logits") else out

    def train(self, model: nn.Module, x: torch.Tensor, steps: int = 3, lr: float = 1e-2,
              train_mode: bool = True) -> list[float]:
        """A few AdamW steps on a fixed regression target, so the adapter becomes non-trivial.

        Only parameters with ``requires_grad`` are given to the optimizer, as a user would do. Weight decay
        is on, so a frozen parameter reaching the optimizer by mistake would change even with no gradient.

        Returns:
            The loss of each step.
        """
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
        gen = torch.Generator().manual_seed(123)
        model.train(train_mode)
        losses = []
        target = None
        for _ in range(steps):
            y = self.logits(model, x)
            if target is None:
                target = torch.randn(y.shape, generator=gen)
            loss = (y - target).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        return losses


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run on one thread: tiny models' ops take microseconds, so a second thread only adds
    synchronisation, and on a busy 2-core machine it made these tests 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def tiny(one_thread) -> TinyModels:
    return TinyModels()


@pytest.fixture
def snapshot() -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    """A function returning a detached copy of every named parameter of a module."""

    def take(module: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    return take


@pytest.fixture(scope="session")
def missing_data() -> Callable[[str], None]:
    """``missing(message)``: skip here, fail in CI."""
    return missing


@pytest.fixture(scope="session")
def fashion_mnist_parts():
    """Fashion-MNIST's arrays (Debian package dataset-fashion-mnist); missing: skipped here, failed in CI, since
    the README's `snella bench accuracy` and `snella pretrain` need it."""
    from snella.data.builtin import fashion_mnist

    try:
        return fashion_mnist()
    except FileNotFoundError as error:
        missing(f"Fashion-MNIST is not installed: {error}")
