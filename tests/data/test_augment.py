"""random_shift: each image moved by its own offset, edges repeated, reproducible from the generator."""

import pytest
import torch

from snella.data.augment import random_shift


def reference_shift(image, dy, dx):
    """out[i, j] = image[clamp(i - dy), clamp(j - dx)], one pixel at a time."""
    C, H, W = image.shape
    out = torch.empty_like(image)
    for i in range(H):
        for j in range(W):
            out[:, i, j] = image[:, min(max(i - dy, 0), H - 1), min(max(j - dx, 0), W - 1)]
    return out


def test_each_image_is_its_reference_translation():
    images = torch.randn(6, 3, 7, 9, generator=torch.Generator().manual_seed(0))
    out = random_shift(images, 2, torch.Generator().manual_seed(1))
    # the same draws random_shift makes: (2, B) offsets into the padded image, 0..2n
    offsets = torch.randint(0, 5, (2, 6), generator=torch.Generator().manual_seed(1))
    assert out.shape == images.shape
    for b in range(6):
        dy, dx = 2 - int(offsets[0, b]), 2 - int(offsets[1, b])
        torch.testing.assert_close(out[b], reference_shift(images[b], dy, dx), rtol=0, atol=0)
    assert len({tuple(offsets[:, b].tolist()) for b in range(6)}) > 1  # images get their own offsets


def test_same_generator_seed_same_batch_and_zero_is_identity():
    images = torch.rand(4, 1, 8, 8)
    a = random_shift(images, 3, torch.Generator().manual_seed(5))
    b = random_shift(images, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert random_shift(images, 0, torch.Generator()) is images


def test_shift_as_large_as_the_image_is_refused():
    with pytest.raises(ValueError, match="max_shift=8 is invalid for 8x8 images; accepted: 0 to 7"):
        random_shift(torch.rand(1, 1, 8, 8), 8, torch.Generator())
