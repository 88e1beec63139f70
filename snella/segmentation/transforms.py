"""Paired transforms: one geometry applied to an image and its mask together (nearest for masks), then normalisation."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from snella.data.transforms import _per_channel

PAIRED_TRANSFORM_NAMES = ("resize", "flip-crop", "none")
INTERPOLATIONS = ("bilinear", "bicubic")


def resize_pair(image: Tensor, mask: Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> tuple[Tensor, Tensor]:
    """Resize an image (smoothly) and its mask (nearest neighbour, so labels stay labels) to ``size``.

    Args:
        image: ``(C, H, W)`` float image.
        mask: ``(H, W)`` integer label map.
        size: ``(height, width)`` of the result.
        interpolation: "bilinear" or "bicubic" for the image (antialiased when shrinking).

    Returns:
        ``(C, h, w)`` image and ``(h, w)`` mask; a pair already of that size is returned as is.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is not accepted; expected one of {', '.join(INTERPOLATIONS)}")
    if tuple(image.shape[-2:]) == tuple(size):
        return image, mask
    out = F.interpolate(image[None], size=size, mode=interpolation, align_corners=False, antialias=True)[0]
    if interpolation == "bicubic":
        out = out.clamp(float(image.min()), float(image.max()))  # bicubic overshoots the input's range
    # "nearest-exact" samples the pixel whose centre is nearest, as PIL's NEAREST does.
    labels = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(mask.dtype)
    return out, labels


def crop_pair(image: Tensor, mask: Tensor, top: int, left: int, height: int, width: int) -> tuple[Tensor, Tensor]:
    """The same window ``[top:top+height, left:left+width]`` of an image ``(C, H, W)`` and its mask ``(H, W)``."""
    H, W = mask.shape
    if not (0 <= top and 0 <= left and height >= 1 and width >= 1 and top + height <= H and left + width <= W):
        raise ValueError(f"crop top={top} left={left} height={height} width={width} does not fit a {H}x{W} image")
    return image[:, top:top + height, left:left + width], mask[top:top + height, left:left + width]


def hflip_pair(image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror an image ``(C, H, W)`` and its mask ``(H, W)`` left to right."""
    return image.flip(-1), mask.flip(-1)


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            generator: torch.Generator) -> tuple[int, int, int, int]:
    """A random window (top, left, h, w) covering ``scale`` of the area with aspect ratio in ``ratio``.

    torchvision's RandomResizedCrop rule (10 tries, then the central crop of the nearest allowed ratio),
    drawn from ``generator`` so that a seeded run sees the same crops.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop at the closest allowed ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PairedTransform:
    """``(image (C, H, W) float in [0, 1], mask (H, W) long) -> (normalised image, mask)``.

    Geometry by name:
      - "resize": squash to ``size`` (test-time and train-time alike, deterministic);
      - "flip-crop" (training): random resized crop (scale ``crop_scale``, ratio 3/4..4/3) to ``size``,
        then a horizontal flip with probability ``flip_p``; at test time (``train=False``) it is "resize";
      - "none": keep the size (only normalise).

    Randomness comes from the generator passed to ``__call__`` (or the transform's own, seeded with
    ``seed``), so runs seeded alike see the same crops and flips.
    """

    def __init__(self, name: str, size: int | tuple[int, int], train: bool, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), channels: int = 3, interpolation: str = "bilinear",
                 crop_scale: tuple[float, float] = (0.5, 1.0), flip_p: float = 0.5, seed: int = 0) -> None:
        if name not in PAIRED_TRANSFORM_NAMES:
            raise ValueError(f"unknown paired transform {name!r}; expected one of {', '.join(PAIRED_TRANSFORM_NAMES)}")
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={interpolation!r} is not accepted; expected one of {', '.join(INTERPOLATIONS)}")
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale={crop_scale!r} must satisfy 0 < low <= high <= 1")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p={flip_p!r} must be in [0, 1]")
        self.name, self.size, self.train, self.channels = name, size, train, channels
        self.interpolation, self.crop_scale, self.flip_p = interpolation, tuple(crop_scale), flip_p
        self.mean = torch.tensor(_per_channel(mean, channels, "mean")).view(-1, 1, 1)  # (C, 1, 1)
        self.std = torch.tensor(_per_channel(std, channels, "std")).view(-1, 1, 1)
        if float(self.std.min()) <= 0:
            raise ValueError(f"std must be positive, got {tuple(self.std.flatten().tolist())}")
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def deterministic(self) -> bool:
        """Whether the same pair always gives the same output (no augmentation): then it can be cached."""
        return not (self.name == "flip-crop" and self.train)

    def __call__(self, image: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if image.ndim != 3 or mask.ndim != 2 or tuple(image.shape[1:]) != tuple(mask.shape):
            raise ValueError(f"expected image (C, H, W) and mask (H, W) of the same size, got {tuple(image.shape)} "
                             f"and {tuple(mask.shape)}")
        if image.shape[0] != self.channels:
            raise ValueError(f"image has {image.shape[0]} channel(s), the transform expects {self.channels}")
        gen = generator if generator is not None else self.generator
        if self.name == "flip-crop" and self.train:
            top, left, h, w = random_resized_crop_box(*mask.shape, self.crop_scale, (3 / 4, 4 / 3), gen)
            image, mask = crop_pair(image, mask, top, left, h, w)
            image, mask = resize_pair(image, mask, self.size, self.interpolation)
            if float(torch.rand(1, generator=gen)) < self.flip_p:
                image, mask = hflip_pair(image, mask)
        elif self.name != "none":
            image, mask = resize_pair(image, mask, self.size, self.interpolation)
        return (image - self.mean) / self.std, mask

    def __repr__(self) -> str:
        return (f"PairedTransform(name={self.name!r}, size={self.size}, train={self.train}, channels={self.channels}, "
                f"interpolation={self.interpolation!r})")
