"""Tests of snella.data.transforms: shapes, the recipes' geometry, normalisation values, determinism flags."""

import numpy as np
import pytest
import torch
from PIL import Image

from snella.data import IMAGENET_MEAN, IMAGENET_STD, TRANSFORM_NAMES, build_transform, is_deterministic


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def to_unit(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) in [0, 1], the reference for ToImage + ToDtype(scale=True)."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def test_vtab_is_a_bicubic_squash_with_normalisation():
    image = random_image(40, 20)
    out = build_transform("vtab", 16, train=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)(image)
    reference = to_unit(image.resize((16, 16), Image.BICUBIC))  # (3, 16, 16)
    reference = (reference - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert type(out) is torch.Tensor  # a plain tensor, not a torchvision tv_tensor
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_none_keeps_size_and_normalises_each_channel():
    pixels = np.array([[[0, 128, 255], [51, 102, 204]]], dtype=np.uint8)  # (H=1, W=2, 3)
    out = build_transform("none", 224, train=False, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.2))(Image.fromarray(pixels))
    expected = (pixels.astype(np.float32) / 255 - [0.1, 0.2, 0.3]) / [0.5, 0.25, 0.2]  # (1, 2, 3)
    assert out.shape == (3, 1, 2)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_default_normalisation_maps_0_and_255_to_minus_1_and_1():
    pixels = np.array([[0, 255]], dtype=np.uint8)
    out = build_transform("none", 8, train=False)(Image.fromarray(pixels).convert("RGB"))
    assert out[:, 0, 0].tolist() == [-1.0] * 3 and out[:, 0, 1].tolist() == [1.0] * 3


def test_fgvc_test_resizes_short_side_then_centre_crops():
    # Left third black, middle white, right third black: the central crop must be all white.
    pixels = np.zeros((56, 168, 3), dtype=np.uint8)  # (H, W, 3)
    pixels[:, 56:112] = 255
    out = build_transform("fgvc", 32, train=False)(Image.fromarray(pixels))
    # 32 * 256 / 224 = 36.57 -> short side 36, so 108 x 36; the central 32 x 32 lies in the white band.
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out, torch.ones_like(out))


def test_fgvc_train_augments_at_random_and_flags_it():
    transform = build_transform("fgvc", 24, train=True)
    image = random_image(50, 40)
    torch.manual_seed(0)
    outs = [transform(image) for _ in range(4)]
    assert all(o.shape == (3, 24, 24) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert transform.deterministic is False


@pytest.mark.parametrize("name", ["vtab", "none"])
def test_deterministic_transforms_repeat_exactly(name):
    transform = build_transform(name, 12, train=True)
    image = random_image(30, 17, seed=1)
    assert torch.equal(transform(image), transform(image))
    assert transform.deterministic is True


def test_is_deterministic_flags():
    assert is_deterministic("vtab", True) and is_deterministic("vtab", False)
    assert is_deterministic("none", True)
    assert not is_deterministic("fgvc", True) and is_deterministic("fgvc", False)


def test_one_channel_gives_grey_and_broadcasts_equal_mean():
    grey = Image.fromarray(np.full((5, 7, 3), 51, dtype=np.uint8))
    transform = build_transform("vtab", 9, train=False, channels=1)
    out = transform(grey)
    assert transform.image_mode == "L"
    assert out.shape == (1, 9, 9)
    torch.testing.assert_close(out, torch.full((1, 9, 9), (0.2 - 0.5) / 0.5), atol=1e-6, rtol=0)


def test_unknown_name_lists_accepted_names():
    with pytest.raises(ValueError, match="unknown transform 'randaug'.*vtab, fgvc, none"):
        build_transform("randaug", 32, train=True)
    with pytest.raises(ValueError, match="unknown transform"):
        is_deterministic("randaug", False)
    assert TRANSFORM_NAMES == ("vtab", "fgvc", "none")


@pytest.mark.parametrize("kwargs, message", [
    (dict(channels=1, mean=IMAGENET_MEAN), "mean has 3 values"),
    (dict(channels=3, std=(0.5, 0.5)), "std has 2 values"),
    (dict(channels=2), "channels must be 1 or 3"),
    (dict(std=(0.0, 0.0, 0.0)), "std must be positive"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_transform("vtab", 8, train=False, **kwargs)


def test_bad_image_size_is_named():
    with pytest.raises(ValueError, match="image_size must be a positive int, got 0"):
        build_transform("vtab", 0, train=False)


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 3), ("RGBA", 3), ("RGB", 1), ("L", 1)])
def test_none_with_fit_size_brings_any_image_to_the_model_input(mode, channels):
    image = random_image(45, 30).convert(mode)
    out = build_transform("none", 16, train=False, mean=(0.5,), std=(0.25,), channels=channels, fit_size=True)(image)
    # By hand: PIL's conversion to the model's mode, PIL's bicubic resize, then (x - mean) / std.
    reference = np.asarray(image.convert("L" if channels == 1 else "RGB").resize((16, 16), Image.BICUBIC),
                           dtype=np.float32).reshape(16, 16, channels) / 255.0
    assert out.shape == (channels, 16, 16)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), (reference - 0.5) / 0.25, atol=1e-5)


def test_fit_size_leaves_images_of_the_model_size_alone():
    image = random_image(16, 16)
    fitted = build_transform("none", 16, train=False, fit_size=True)(image)
    assert torch.equal(fitted, build_transform("none", 16, train=False)(image))  # not even resampled
    assert build_transform("none", 16, train=False)(random_image(45, 30)).shape == (3, 30, 45)  # default: kept
