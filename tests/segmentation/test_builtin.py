"""Built-in real data: LiTS liver CT slices (PyPI liver-ct-segmentation-package) and Fashion-MNIST composites."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from snella.segmentation import composites, liver


@pytest.fixture(scope="module")
def liver_volumes(missing_data):
    """The raw volumes read here with mrcfile, independently of snella.segmentation.liver."""
    spec = importlib.util.find_spec(liver.LIVER_PACKAGE)
    if spec is None:
        missing_data(f"the liver CT package is not installed: {liver.LIVER_PIP}")
    import mrcfile

    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    with mrcfile.open(os.path.join(folder, "img_117.mrc"), permissive=True) as f:
        hu = np.array(f.data)
    with mrcfile.open(os.path.join(folder, "lab_117.mrc"), permissive=True) as f:
        labels = np.array(f.data)
    return hu, labels


def test_slice_splits_leave_a_gap_between_splits():
    parts = liver.slice_splits(128)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [72, 12, 20]
    owner = {int(i): s for s, idx in parts.items() for i in idx}
    assert len(owner) == 104  # disjoint
    for i, s in owner.items():
        for j, t in owner.items():
            if s != t:
                assert abs(i - j) >= 5, f"slice {i} ({s}) and slice {j} ({t}) are neighbours"


def test_hu_window_maps_the_liver_window_to_grey():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 1800.0])
    assert liver.hu_window(hu, 40.0, 400.0).tolist() == [0, 0, 128, 255, 255]


def test_liver_slices_are_the_axial_slices_of_the_volume(liver_volumes):
    hu, labels = liver_volumes
    data = liver.load_liver("test")
    assert data.classes == ["background", "liver", "tumour"] and len(data) == 20
    k = int(liver.slice_splits(128)["test"][3])
    assert int(data.slices[3]) == k
    expected = liver.hu_window(hu[:, :, k].T, 40.0, 400.0)  # axial slice k: last axis of the (x, y, z) volume
    image, mask = data[3]
    assert image.shape == (3, 128, 128)
    assert np.array_equal(np.round(image[0].numpy() * 255).astype(np.uint8), expected)
    assert np.array_equal(mask.numpy(), labels[:, :, k].T.astype(np.int64))
    # every split has liver and tumour pixels; together with the gap slices they are the whole volume
    counts = sum(np.bincount(liver.load_liver(s).masks.ravel(), minlength=3) for s in ("train", "val", "test"))
    assert counts[1] > 0 and counts[2] > 0
    assert counts[1] + counts[2] < int((labels > 0).sum()) == 485268 + 130083
    assert len(liver.load_liver("trainval")) == 84


def test_render_gives_exact_masks_with_class_plus_one():
    item = np.zeros((28, 28), dtype=np.uint8)
    item[4:24, 6:20] = 200
    item[10:12, 10:12] = 20  # a dark patch inside the item: below the threshold, so background
    rng = np.random.default_rng(0)
    image, mask, boxes = composites.render(item[None], np.array([7]), rng, canvas=40, scale=(1.0, 1.0))
    assert set(np.unique(mask).tolist()) == {0, 8}
    assert ((mask == 8) == (image > composites.THRESHOLD)).all()
    assert (mask == 8).sum() == 20 * 14 - 4 and len(boxes) == 1 and boxes[0][2:] == (20, 14, 7)


def test_composites_are_exact_deterministic_and_varied(fashion_mnist_parts):
    images, masks = composites.make_composites("val", seed=0, size=40)
    again = composites.make_composites("val", seed=0, size=40)
    other = composites.make_composites("val", seed=1, size=40)
    assert np.array_equal(images, again[0]) and np.array_equal(masks, again[1])
    assert not np.array_equal(images, other[0])
    assert images.shape == (40, 56, 56) and masks.max() <= 10
    assert ((masks > 0) == (images > composites.THRESHOLD)).all()  # objects never overlap: masks are exact
    per_image = [len(set(np.unique(m).tolist()) - {0}) for m in masks]
    assert min(per_image) >= 1 and max(per_image) <= 3 and len(set(per_image)) > 1


def test_composite_dataset_classes(fashion_mnist_parts):
    data = composites.load_composites("test", size=4)
    assert data.num_classes == 11 and data.classes[0] == "background" and data.classes[1] == "T-shirt/top"
    image, mask = data[0]
    assert image.shape == (3, 56, 56) and mask.shape == (56, 56)
    assert len(composites.load_composites("trainval", size=3)) == 6
