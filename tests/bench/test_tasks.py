"""The accuracy suite's tasks hold what their labels say: object counts are blob counts, rotations are
rotations of the source, locations and distances match the pixels; splits are disjoint, sized and seeded."""

import numpy as np
import pytest

from snella.bench import tasks as T

ndimage = pytest.importorskip("scipy.ndimage")


@pytest.fixture(scope="module")
def fmnist(fashion_mnist_parts):
    return fashion_mnist_parts  # a skip where it is missing, a failure in CI (tests/conftest.py)


SMALL = dict(train=60, val=24, test=36)


@pytest.fixture(scope="module")
def structured(fmnist):
    return {name: T.build_task(name, seed=3, **SMALL) for name in ("count", "location", "rotation", "distance")}


def _blobs(image):
    """Bounding boxes (top, left, h, w) of the 8-connected non-zero blobs of an image."""
    labels, n = ndimage.label(image > 0, structure=np.ones((3, 3)))
    return [(s[0].start, s[1].start, s[0].stop - s[0].start, s[1].stop - s[1].start) for s in ndimage.find_objects(labels)]


def test_count_images_hold_as_many_separate_objects_as_the_label_says(structured):
    task = structured["count"]
    for split in task.splits.values():
        for image, label, sources in zip(split.images, split.labels, split.sources):
            count = int(label) + 1
            assert task.classes[label] == str(count)
            assert len(_blobs(image)) == count
            assert (sources >= 0).sum() == count and len(set(sources[sources >= 0])) == count


def test_rotation_label_is_the_rotation_of_the_source_image(structured, fmnist):
    task = structured["rotation"]
    for split in task.splits.values():
        for image, label, (source,) in zip(split.images, split.labels, split.sources):
            original = fmnist.test_images[source]
            assert np.array_equal(image, np.rot90(original, k=int(label)))
            # and not another rotation (garments are not symmetric under a quarter turn)
            assert not np.array_equal(image, np.rot90(original, k=int(label) + 1))


def test_location_label_is_the_grid_cell_of_the_objects_centre(structured):
    task = structured["location"]
    step = T.CANVAS / T.LOCATION_GRID
    for split in task.splits.values():
        for image, label in zip(split.images, split.labels):
            rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
            centre_row, centre_col = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
            assert (int(centre_row // step), int(centre_col // step)) == divmod(int(label), T.LOCATION_GRID)


def test_distance_label_is_the_bin_of_the_distance_between_the_two_objects(structured):
    task = structured["distance"]
    seen = set()
    for split in task.splits.values():
        for image, label in zip(split.images, split.labels):
            boxes = _blobs(image)
            assert len(boxes) == 2
            (r1, c1), (r2, c2) = (T.centre(b) for b in boxes)
            distance = np.hypot(r2 - r1, c2 - c1)
            assert int(np.searchsorted(T.DISTANCE_EDGES, distance, side="right")) == label
            seen.add(int(label))
    assert seen == {0, 1, 2, 3}


def test_structured_splits_never_share_a_source_image(structured):
    for task in structured.values():
        used = {name: set(split.sources[split.sources >= 0].tolist()) for name, split in task.splits.items()}
        assert not used["train"] & used["val"] and not used["train"] & used["test"] and not used["val"] & used["test"]
    pools = T.source_pools(3)
    assert sum(len(p) for p in pools.values()) == 10_000
    assert len(set().union(*(set(p.tolist()) for p in pools.values()))) == 10_000


def test_natural_splits_are_disjoint_balanced_and_the_documented_sizes():
    pytest.importorskip("sklearn")
    task = T.build_task("digits", seed=1)
    sizes = {name: len(split) for name, split in task.splits.items()}
    assert sizes == {"train": 800, "val": 200, "test": 359}  # test: the built-in 20 % test part
    assert np.bincount(task.splits["train"].labels).tolist() == [80] * 10
    ids = {name: set(split.sources[:, 0].tolist()) for name, split in task.splits.items()}
    assert len(ids["train"]) == 800 and not ids["train"] & ids["val"] and not (ids["train"] | ids["val"]) & ids["test"]
    # every image is the source image it names
    from snella.data.builtin import digits

    parts = digits()
    everything = np.concatenate([parts.train_images, parts.test_images])
    split = task.splits["val"]
    assert np.array_equal(split.images, everything[split.sources[:, 0]])
    assert task.trainval().images.shape == (1000, 8, 8)


def test_faces_uses_its_documented_smaller_split():
    pytest.importorskip("skimage")
    task = T.build_task("faces")
    assert [len(task.splits[s]) for s in T.SPLIT_NAMES] == list(T.FACES_SIZES)
    assert sum(T.FACES_SIZES) == 200
    all_ids = np.concatenate([task.splits[s].sources[:, 0] for s in T.SPLIT_NAMES])
    assert len(set(all_ids.tolist())) == 200


def test_the_same_seed_gives_the_same_task_and_another_seed_another(fmnist):
    a = T.build_task("distance", seed=5, train=20, val=10, test=10)
    b = T.build_task("distance", seed=5, train=20, val=10, test=10)
    c = T.build_task("distance", seed=6, train=20, val=10, test=10)
    for name in T.SPLIT_NAMES:
        assert np.array_equal(a.splits[name].images, b.splits[name].images)
        assert np.array_equal(a.splits[name].labels, b.splits[name].labels)
    assert not np.array_equal(a.splits["train"].images, c.splits["train"].images)


def test_full_sizes_and_balanced_labels(fmnist):
    task = T.build_task("count")
    assert [len(task.splits[s]) for s in T.SPLIT_NAMES] == [800, 200, T.STRUCTURED_TEST_SIZE]
    counts = np.bincount(task.splits["train"].labels)
    assert counts.max() - counts.min() <= 1 and len(counts) == T.MAX_COUNT


def test_bad_names_and_sizes_are_refused():
    pytest.importorskip("skimage")
    with pytest.raises(ValueError, match="unknown task 'cifar'.*mnist5k"):
        T.build_task("cifar")
    with pytest.raises(ValueError, match="train size 0"):
        T.build_task("digits", train=0)
    with pytest.raises(ValueError, match="only"):
        T.build_task("faces", train=190, val=20)
