"""Image transforms by name: the VTAB-1k and FGVC recipes of SPEC.md section 6, and a plain one."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

TRANSFORM_NAMES = ("vtab", "fgvc", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_deterministic(name: str, train: bool) -> bool:
    """Whether transform ``name`` maps an image to the same tensor every time (no augmentation).

    A deterministic transform can be applied once and cached (see ``snella.data.materialize``).
    """
    _check_name(name)
    return not (name == "fgvc" and train)


def _check_name(name: str) -> None:
    if name not in TRANSFORM_NAMES:
        raise ValueError(f"unknown transform {name!r}; expected one of {', '.join(TRANSFORM_NAMES)}")


def _per_channel(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    """``values`` with one entry per channel: a single value is repeated, and equal values
    (like the RGB default (0.5, 0.5, 0.5)) serve a one-channel transform."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1 or (channels == 1 and len(set(values)) == 1):
        return values[:1] * channels
    raise ValueError(f"{what} has {len(values)} values {values} but the transform gives {channels} "
                     f"channel(s); give {channels} values or a single one")


class ImageTransform:
    """A named transform: PIL image -> normalised float tensor (channels, H, W).

    Converts its input to RGB (or "L" for one channel) first; datasets read ``image_mode`` to
    hand it images in that mode already.
    """

    def __init__(self, name: str, image_size: int, train: bool, mean: Sequence[float],
                 std: Sequence[float], channels: int, fit_size: bool = False) -> None:
        _check_name(name)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.name, self.image_size, self.train, self.channels = name, image_size, train, channels
        self.fit_size = fit_size
        self.mean = _per_channel(mean, channels, "mean")
        self.std = _per_channel(std, channels, "std")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        self.image_mode = "L" if channels == 1 else "RGB"
        self.deterministic = is_deterministic(name, train)
        self.pipeline = v2.Compose(self._geometry() + [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),  # uint8 0..255 -> 0..1
            v2.Normalize(self.mean, self.std),
            v2.ToPureTensor(),
        ])

    def _geometry(self) -> list:
        s = self.image_size
        if self.name == "vtab":
            # VTAB-1k recipe: squash to s x s, no crop, no augmentation, for train and test alike.
            return [v2.Resize((s, s), interpolation=InterpolationMode.BICUBIC, antialias=True)]
        if self.name == "fgvc" and self.train:
            return [v2.RandomResizedCrop(s, antialias=True), v2.RandomHorizontalFlip()]
        if self.name == "fgvc":
            # 256 -> 224 at the standard size: resize the short side, keep the central square.
            return [v2.Resize(int(s * 256 / 224), antialias=True), v2.CenterCrop(s)]
        if self.fit_size:
            return [_FitSize(s)]  # "none" for images of any size: those of another size are resized
        return []  # "none": the image keeps its size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.pipeline(image.convert(self.image_mode))  # (channels, H, W) float32

    def __repr__(self) -> str:
        return (f"ImageTransform(name={self.name!r}, image_size={self.image_size}, train={self.train}, "
                f"channels={self.channels}, mean={self.mean}, std={self.std}, fit_size={self.fit_size})")


class _FitSize:
    """Resize a PIL image to size x size as "vtab" does (bicubic, antialiased, aspect not kept), unless it
    is that size already: images the model was trained on pass untouched, any other reaches its input."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.resize = v2.Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True)

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.size == (self.size, self.size) else self.resize(image)


def build_transform(name: str, image_size: int, train: bool, mean: Sequence[float] = (0.5, 0.5, 0.5),
                    std: Sequence[float] = (0.5, 0.5, 0.5), channels: int = 3, fit_size: bool = False) -> ImageTransform:
    """Build a transform by name.

    Args:
        name: "vtab" (bicubic resize to image_size x image_size, no augmentation), "fgvc" (train:
            random-resized-crop + horizontal flip; test: resize the short side to
            image_size * 256 / 224, centre-crop image_size) or "none" (no resizing).
        image_size: output height and width (ignored by "none").
        train: whether the transform is for training (only "fgvc" differs).
        mean: per-channel mean subtracted after scaling pixels to [0, 1]: ``channels`` values, or
            one (repeated); equal RGB values also serve ``channels=1`` (ImageNet's: ``IMAGENET_MEAN``).
        std: per-channel divisor, likewise.
        channels: 3 (RGB) or 1 (grey); images of the other kind are converted (PIL: grey copied to R, G
            and B; RGB to luma; an alpha channel dropped).
        fit_size: "none" only: resize an image of another size to image_size x image_size (bicubic,
            as "vtab") instead of keeping its size. For images from outside the training data
            (`snella predict`, `snella evaluate` on other data); the other transforms always give
            image_size x image_size.

    Returns:
        A callable PIL image -> float tensor (channels, H, W), with attributes ``deterministic``
        and ``image_mode``.
    """
    return ImageTransform(name, image_size, train, mean, std, channels, fit_size)
