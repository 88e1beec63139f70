"""Paired transforms: the image and its mask get the same geometry; masks stay labels; seeded randomness."""

from __future__ import annotations

import pytest
import torch

from snella.segmentation.transforms import PairedTransform, crop_pair, hflip_pair, resize_pair


def _pair(h: int = 8, w: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose channel 0 holds each pixel's column index and a mask holding the same numbers as labels."""
    cols = torch.arange(w).repeat(h, 1)  # (h, w)
    image = torch.stack([cols.float(), torch.zeros(h, w), torch.ones(h, w)])  # (3, h, w)
    return image, cols.clone()


def test_resize_uses_nearest_for_the_mask():
    image, mask = torch.zeros(3, 4, 4), torch.tensor([[0, 0, 3, 3]] * 4)
    out_image, out_mask = resize_pair(image, mask, (8, 8))
    assert out_image.shape == (3, 8, 8) and out_mask.dtype == torch.long
    # doubling: each label repeats twice, and no in-between label (1 or 2) appears
    assert out_mask[0].tolist() == [0, 0, 0, 0, 3, 3, 3, 3]
    assert set(out_mask.unique().tolist()) == {0, 3}


def test_resize_smooths_the_image_bilinearly():
    image = torch.tensor([[[0.0, 1.0]]]).expand(3, 1, 2).contiguous()  # (3, 1, 2)
    out, _ = resize_pair(image, torch.zeros(1, 2, dtype=torch.long), (1, 4))
    # half-pixel bilinear, 2 -> 4: sample points at 0.25, 0.75, 1.25, 1.75 of the input -> 0, 0.25, 0.75, 1
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_flip_and_crop_move_image_and_mask_together():
    image, mask = _pair()
    flipped_image, flipped_mask = hflip_pair(image, mask)
    assert flipped_mask[0].tolist() == list(range(11, -1, -1))
    assert torch.equal(flipped_image[0].long(), flipped_mask)
    crop_image, crop_mask = crop_pair(image, mask, 2, 3, 4, 5)
    assert crop_mask.shape == (4, 5) and crop_mask[0].tolist() == [3, 4, 5, 6, 7]
    assert torch.equal(crop_image[0].long(), crop_mask)
    with pytest.raises(ValueError, match="does not fit a 8x12"):
        crop_pair(image, mask, 6, 0, 4, 4)


def test_random_flip_crop_keeps_the_pair_aligned_and_is_seeded():
    image, mask = _pair(16, 16)
    transform = PairedTransform("flip-crop", 8, train=True, mean=(0.0,), std=(1.0,), seed=3)
    flips = 0
    for i in range(20):
        gen = torch.Generator().manual_seed(i)
        out_image, out_mask = transform(image, mask, gen)
        assert out_image.shape == (3, 8, 8) and out_mask.shape == (8, 8)
        # the mask values are columns of the source; nearest-resized, each row is monotone in the same direction
        row = out_mask[0]
        increasing, decreasing = bool((row.diff() >= 0).all()), bool((row.diff() <= 0).all())
        assert increasing or decreasing
        flips += decreasing and not increasing
        again = transform(image, mask, torch.Generator().manual_seed(i))
        assert torch.equal(again[0], out_image) and torch.equal(again[1], out_mask)
    assert 3 <= flips <= 17  # p = 0.5 over 20 draws


def test_normalisation_and_test_mode():
    image, mask = torch.full((3, 4, 4), 0.75), torch.ones(4, 4, dtype=torch.long)
    transform = PairedTransform("flip-crop", 2, train=False, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert transform.deterministic
    out_image, out_mask = transform(image, mask)
    assert out_image.shape == (3, 2, 2) and torch.allclose(out_image, torch.ones(3, 2, 2))  # (0.75 - 0.5) / 0.25
    assert out_mask.tolist() == [[1, 1], [1, 1]]
    assert not PairedTransform("flip-crop", 2, train=True).deterministic


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="rotate"), "unknown paired transform 'rotate'"),
    (dict(interpolation="nearest"), "interpolation='nearest' is not accepted"),
    (dict(crop_scale=(0.0, 1.0)), "crop_scale"),
    (dict(std=(0.0,)), "std must be positive"),
])
def test_bad_settings_are_refused(kwargs, message):
    args = dict(name="resize", size=4, train=True) | kwargs
    with pytest.raises(ValueError, match=message):
        PairedTransform(**args)


def test_mismatched_pair_is_refused():
    with pytest.raises(ValueError, match="same size"):
        PairedTransform("resize", 4, train=False)(torch.zeros(3, 4, 4), torch.zeros(4, 5, dtype=torch.long))
