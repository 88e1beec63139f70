"""Tests of LabeledDataset's construction checks: labels out of range name the item and the value."""

import numpy as np
import pytest

from snella.data.base import ArrayDataset, FileDataset


def test_file_label_out_of_range_names_file_and_value(image_tree):
    paths = [str(image_tree / "cat" / "c0.png"), str(image_tree / "dog" / "d0.jpg")]
    with pytest.raises(ValueError, match=f"{paths[1]}: label 2 is out of range for 2 classes"):
        FileDataset(paths, [0, 2], ["cat", "dog"], "src", "train")


def test_array_label_out_of_range_and_bad_arrays():
    images = np.zeros((3, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"src \[test\] item 0: label -1 is out of range.*2 label\(s\)"):
        ArrayDataset(images, [-1, 0, 5], ["a", "b"], "src", "test")
    with pytest.raises(ValueError, match="expected uint8 images"):
        ArrayDataset(images.astype(np.float32), [0, 0, 0], ["a"], "src", "test")
    data = ArrayDataset(images, [0, 1, 1], ["a", "b"], "src", "test")
    assert repr(data) == "ArrayDataset(source='src', split='test', len=3, num_classes=2)"
