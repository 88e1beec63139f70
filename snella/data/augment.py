"""Batch-level augmentation of images already turned into tensors (cached datasets stay cached)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate every image by its own random offset of up to ``max_shift`` pixels each way.

    The border is extended by repeating its edge pixels (replicate padding), so a digit on a black
    background keeps a black background and a photo keeps its edge colours; the output has the
    input's size. Offsets are drawn from ``generator`` (2 integers per image, on the CPU), so a run
    seeded the same way sees the same shifts, resumed or not.

    Args:
        images: ``(B, C, H, W)`` floating-point batch.
        max_shift: largest offset in pixels, ``0 <= max_shift < min(H, W)``; 0 returns ``images``.
        generator: a CPU ``torch.Generator``.

    Returns:
        ``(B, C, H, W)`` shifted images: ``out[b, :, i, j] = images[b, :, clamp(i - dy_b), clamp(j - dx_b)]``.
    """
    if max_shift == 0:
        return images
    B, C, H, W = images.shape
    if not 0 < max_shift < min(H, W):
        raise ValueError(f"max_shift={max_shift} is invalid for {H}x{W} images; accepted: 0 to {min(H, W) - 1}")
    n = max_shift
    padded = F.pad(images, (n, n, n, n), mode="replicate")  # (B, C, H + 2n, W + 2n)
    offsets = torch.randint(0, 2 * n + 1, (2, B), generator=generator).to(images.device)  # (2, B): top, left
    rows = offsets[0, :, None] + torch.arange(H, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(W, device=images.device)  # (B, W)
    batch = torch.arange(B, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.contiguous_format)
