"""Tests for tfdogs.data: layouts, synthetic data, splits, image ops and the tf.data pipeline."""

import csv
import hashlib
import io
import os
import pathlib
import socket
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfdogs import data
from tfdogs.data.augment import build_augmentation

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# mean 0 / std 1 leaves images in [0, 1], so tests can read colours back.
UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
RED, GREEN, BLUE = (220, 20, 30), (25, 200, 40), (30, 40, 210)


def _encode(pixels, format, **options):
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format=format, **options)
    return buffer.getvalue()


def _solid(colour, height=12, width=16):
    return np.broadcast_to(np.array(colour, np.uint8), (height, width, len(colour)))


def _write_image(path, colour, format="JPEG", height=12, width=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encode(_solid(colour, height, width), format))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic")
    return data.make_synthetic(directory, num_classes=3, images_per_class=6, image_size=32)


@pytest.fixture
def colour_folders(tmp_path):
    """Class folders of uniform colours, JPEG and PNG, of several sizes: blue=0, green=1, red=2."""
    for breed, colour in (("red", RED), ("green", GREEN), ("blue", BLUE)):
        for i, (format, height, width) in enumerate((("JPEG", 40, 60), ("PNG", 50, 30), ("JPEG", 33, 33))):
            _write_image(tmp_path / breed / f"{i}.{format.lower()}", colour, format, height, width)
    return data.find_records(tmp_path)


def _take_numpy(dataset, count=None):
    batches = dataset if count is None else dataset.take(count)
    return [(images.numpy(), labels.numpy()) for images, labels in batches]


# ----------------------------------------------------------------------------- layouts


def test_kaggle_layout(synthetic):
    records = data.find_records(synthetic)
    assert records.layout == "kaggle"
    assert records.root == str(synthetic.resolve())
    assert records.class_names == ["beagle", "boxer", "chihuahua"]
    assert records.labels.dtype == np.int64 and np.bincount(records.labels).tolist() == [6, 6, 6]
    with open(synthetic / "labels.csv") as file:
        rows = list(csv.DictReader(file))
    assert [pathlib.Path(p).stem for p in records.paths] == [row["id"] for row in rows]
    assert [records.class_names[label] for label in records.labels] == [row["breed"] for row in rows]


def test_class_folder_layout(tmp_path):
    _write_image(tmp_path / "pug" / "b.png", RED, "PNG")
    _write_image(tmp_path / "pug" / "a.JPG", RED)
    _write_image(tmp_path / "boxer" / "c.jpeg", BLUE)
    (tmp_path / "boxer" / "notes.txt").write_text("not an image")
    (tmp_path / "README.md").write_text("stray files beside the class folders are fine")
    records = data.find_records(tmp_path)
    assert records.layout == "folders"
    assert records.class_names == ["boxer", "pug"]
    assert [pathlib.Path(p).name for p in records.paths] == ["c.jpeg", "a.JPG", "b.png"]
    assert records.labels.tolist() == [0, 1, 1]
    assert all(os.path.isabs(p) for p in records.paths)


def test_stanford_nested_layout_strips_wordnet_ids(tmp_path):
    _write_image(tmp_path / "Images" / "n02085620-Chihuahua" / "n02085620_1.jpg", RED)
    _write_image(tmp_path / "Images" / "n02086240-Shih-Tzu" / "n02086240_7.jpg", BLUE)
    (tmp_path / "Annotation" / "n02085620-Chihuahua").mkdir(parents=True)
    (tmp_path / "Annotation" / "n02085620-Chihuahua" / "n02085620_1").write_text("<annotation/>")
    records = data.find_records(tmp_path)
    assert records.layout == "folders" and records.root == str(tmp_path.resolve())
    assert records.class_names == ["chihuahua", "shih-tzu"]
    assert [pathlib.Path(p).name for p in records.paths] == ["n02085620_1.jpg", "n02086240_7.jpg"]


def test_directory_with_neither_layout_says_what_it_found(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "c.txt").write_text("no images here")
    with pytest.raises(data.DataError) as error:
        data.find_records(tmp_path)
    message = str(error.value)
    assert str(tmp_path.resolve()) in message
    assert "found: a.txt, b/" in message
    assert "labels.csv" in message and "<breed>/*.jpg" in message


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(data.DataError, match="does not exist") as error:
        data.find_records(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)


def test_kaggle_directory_without_labels_csv_is_not_taken_for_classes(synthetic, tmp_path):
    for subset in ("train", "test"):
        _write_image(tmp_path / subset / "0a1b.jpg", RED)
    with pytest.raises(data.DataError, match="no labels.csv"):
        data.find_records(tmp_path)


def test_kaggle_problems_name_the_file(tmp_path):
    _write_image(tmp_path / "train" / "abc.jpg", RED)
    (tmp_path / "labels.csv").write_text("id,dog\nabc,pug\n")
    with pytest.raises(data.DataError, match=r"labels.csv: header is 'id,dog'; expected 'id,breed'"):
        data.find_records(tmp_path)
    (tmp_path / "labels.csv").write_text("id,breed\nabc,pug\nxyz,boxer\n")
    with pytest.raises(data.DataError, match=r"1 of 2 images .* missing.*xyz\.jpg"):
        data.find_records(tmp_path)


# ----------------------------------------------------------------------------- synthetic data


def test_make_synthetic_is_deterministic_per_seed(tmp_path):
    def file_bytes(seed):
        directory = data.make_synthetic(tmp_path / f"seed{seed}_{len(list(tmp_path.iterdir()))}",
                                        num_classes=2, images_per_class=3, image_size=32, seed=seed)
        files = sorted(p for p in directory.rglob("*") if p.is_file())
        return {str(p.relative_to(directory)): p.read_bytes() for p in files}

    first, again, other = file_bytes(0), file_bytes(0), file_bytes(1)
    assert first == again
    assert first.keys() != other.keys()
    assert first["labels.csv"] != other["labels.csv"]


def test_make_synthetic_files(synthetic):
    with open(synthetic / "labels.csv") as file:
        reader = csv.reader(file)
        assert next(reader) == ["id", "breed"]
        rows = list(reader)
    assert len(rows) == 18
    assert {breed: sum(r[1] == breed for r in rows) for breed in ("beagle", "boxer", "chihuahua")} == {
        "beagle": 6, "boxer": 6, "chihuahua": 6}
    assert all(len(image_id) == 32 for image_id, _ in rows)
    image = data.decode_image(tf.io.read_file(str(synthetic / "train" / f"{rows[0][0]}.jpg")))
    assert image.shape == (32, 32, 3)
    with open(synthetic / "sample_submission.csv") as file:
        submission = list(csv.reader(file))
    assert submission[0] == ["id", "beagle", "boxer", "chihuahua"]
    test_ids = sorted(p.stem for p in (synthetic / "test").glob("*.jpg"))
    assert [row[0] for row in submission[1:]] == test_ids and len(test_ids) == 6
    assert all(abs(sum(map(float, row[1:])) - 1) < 1e-9 for row in submission[1:])


def test_make_synthetic_class_count_limits(tmp_path):
    from tfdogs.data.breeds import KAGGLE_BREEDS

    many = data.find_records(
        data.make_synthetic(tmp_path / "many", num_classes=20, images_per_class=1, image_size=16))
    assert len(many.class_names) == 20 and set(many.class_names) <= set(KAGGLE_BREEDS)
    with pytest.raises(data.DataError, match="num_classes"):
        data.make_synthetic(tmp_path / "one", num_classes=1)


# ----------------------------------------------------------------------------- splits


def test_stratified_split_is_stratified_disjoint_and_reproducible():
    labels = np.repeat([0, 1, 2, 3, 4], [10, 7, 3, 2, 1])
    train, val = data.stratified_split(labels, val_fraction=0.3, seed=4)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    for label, count in zip(range(5), (10, 7, 3, 2, 1)):
        val_count = np.sum(labels[val] == label)
        if count >= 2:
            assert abs(val_count - 0.3 * count) <= 1 and 1 <= val_count <= count - 1
    assert np.sum(labels[val] == 4) == 0 and np.sum(labels[train] == 4) == 1  # the singleton trains
    again = data.stratified_split(labels, val_fraction=0.3, seed=4)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(val, again[1])
    other = data.stratified_split(labels, val_fraction=0.3, seed=5)
    assert not np.array_equal(val, other[1])


def test_grouped_split_keeps_each_group_on_one_side_stratified_and_reproducible():
    labels = np.repeat([0, 1, 2, 3], [12, 10, 6, 4])
    # groups of byte-identical copies: pairs, a triple, and a conflict (labels 0 and 1) spanning two breeds
    groups = np.arange(len(labels))
    for copies in ([0, 1], [2, 3, 4], [12, 13], [22, 23], [28, 29], [5, 14]):
        groups[copies] = copies[0]
    for seed in range(10):
        train, val = data.stratified_split(labels, val_fraction=0.5, seed=seed, groups=groups)
        np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
        for group in np.unique(groups):
            sides = {bool(np.isin(index, val)) for index in np.flatnonzero(groups == group)}
            assert len(sides) == 1, f"seed {seed}: group {group} split across training and validation"
        for label, count in zip(range(4), (12, 10, 6, 4)):
            val_count = np.sum(labels[val] == label)
            assert abs(val_count - 0.5 * count) <= 2 and 1 <= val_count <= count - 1, (seed, label, val_count)
        again = data.stratified_split(labels, val_fraction=0.5, seed=seed, groups=groups)
        np.testing.assert_array_equal(val, again[1])
    other = data.stratified_split(labels, val_fraction=0.5, seed=1, groups=groups)[1]
    assert not np.array_equal(data.stratified_split(labels, val_fraction=0.5, seed=0, groups=groups)[1], other)
    # one image per group is the ungrouped split, so runs without copies keep their splits
    singles = data.stratified_split(labels, val_fraction=0.3, seed=4, groups=np.arange(len(labels)) * 7)
    for grouped, plain in zip(singles, data.stratified_split(labels, val_fraction=0.3, seed=4)):
        np.testing.assert_array_equal(grouped, plain)
    with pytest.raises(data.DataError, match="one id per image"):
        data.stratified_split(labels, groups=groups[:-1])


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_stratified_split_rejects_fraction_outside_unit_interval(fraction):
    with pytest.raises(data.DataError, match="val_fraction"):
        data.stratified_split([0, 0, 1, 1], val_fraction=fraction)


def test_split_csv_round_trip(synthetic, tmp_path):
    records = data.find_records(synthetic)
    train, val = data.stratified_split(records.labels, 0.25, seed=1)
    split_path = tmp_path / "splits" / "split.csv"
    digests = [hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest() for path in records.paths]
    data.write_split(split_path, records, train, val, digests)
    with open(split_path) as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["path", "label", "breed", "subset", "sha256"]
    assert sorted(row[4] for row in rows[1:]) == sorted(digests)
    assert "train/" in split_path.read_text() and str(synthetic) not in split_path.read_text()
    read_records, read_train, read_val = data.read_split(split_path, synthetic)
    assert read_records.paths == records.paths
    np.testing.assert_array_equal(read_records.labels, records.labels)
    assert read_records.class_names == records.class_names and read_records.layout == "kaggle"
    np.testing.assert_array_equal(read_train, train)
    np.testing.assert_array_equal(read_val, val)


def test_read_split_reports_malformed_and_missing(synthetic, tmp_path):
    split_path = tmp_path / "split.csv"
    split_path.write_text("path,label,breed,subset\ntrain/x.jpg,0,pug,test\n")
    with pytest.raises(data.DataError, match=r"line 2: subset 'test'"):
        data.read_split(split_path, synthetic)
    split_path.write_text("file,label\ntrain/x.jpg,0\n")
    with pytest.raises(data.DataError, match="header"):
        data.read_split(split_path, synthetic)
    split_path.write_text("path,label,breed,subset\ntrain/x.jpg,0,pug,train\n")
    with pytest.raises(data.DataError, match=r"1 of 1 images .* missing.*x\.jpg"):
        data.read_split(split_path, synthetic)


# ----------------------------------------------------------------------------- Stanford Dogs


def test_load_stanford_dogs_fails_fast_offline(tmp_path, monkeypatch):
    import tensorflow_datasets  # noqa: F401  (imported before timing: only the network check is timed)

    attempts = []

    def unreachable(address, timeout=None, *args, **kwargs):
        attempts.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.perf_counter()
    with pytest.raises(data.DataError) as error:
        data.load_stanford_dogs(tmp_path, timeout=0.5)
    assert time.perf_counter() - start < 2
    assert attempts == [(("vision.stanford.edu", 80), 0.5)]
    message = str(error.value)
    assert "needs internet" in message and "--data-dir path/to/dog-breed-identification" in message


def test_stanford_export_to_class_folders_then_no_network(tmp_path, monkeypatch):
    jpeg = _encode(_solid(RED), "JPEG")
    examples = [
        {"image": jpeg, "image/filename": b"Images/n02085620-Chihuahua/n02085620_1.jpg", "label": 0},
        {"image": jpeg, "image/filename": "Images/n02085620-Chihuahua/n02085620_2.jpg", "label": np.int64(0)},
        {"image": jpeg, "image/filename": b"Images/n02086240-Shih-Tzu/n02086240_3.jpg", "label": 1},
    ]
    folder = tmp_path / "tfdogs_stanford_dogs"
    assert data.export_to_class_folders(examples, ["n02085620-chihuahua", "n02086240-shih-tzu"], folder) == 3
    assert (folder / "chihuahua" / "n02085620_2.jpg").read_bytes() == jpeg  # original bytes, no re-encode
    records = data.find_records(folder)
    assert records.class_names == ["chihuahua", "shih-tzu"] and records.labels.tolist() == [0, 0, 1]

    def no_network(*args, **kwargs):
        raise AssertionError("a complete export must not touch the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    assert data.load_stanford_dogs(tmp_path) == folder


# ----------------------------------------------------------------------------- image ops


def _two_colour(height=6, width=8):
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2:] = BLUE
    return pixels


def _gif_two_frames():
    frames = [Image.fromarray(_two_colour()).convert("P", palette=Image.ADAPTIVE, colors=4),
              Image.fromarray(_solid(GREEN, 6, 8).copy()).convert("P", palette=Image.ADAPTIVE, colors=4)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


IMAGE_CASES = {
    "png": (lambda: _encode(_two_colour(), "PNG"), _two_colour(), 0),
    "gif_first_frame": (_gif_two_frames, _two_colour(), 4),
    "bmp": (lambda: _encode(_two_colour(), "BMP"), _two_colour(), 0),
    "webp_lossless": (lambda: _encode(_two_colour(), "WEBP", lossless=True), _two_colour(), 0),
    "grayscale_jpeg": (lambda: _encode(np.full((6, 8), 120), "JPEG"), np.full((6, 8, 3), 120), 3),
    "rgba_png": (lambda: _encode(np.dstack([_two_colour(), np.full((6, 8), 90)]), "PNG"), _two_colour(), 0),
}


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_decode_image_eagerly_and_in_dataset_map(case):
    make_bytes, expected, tolerance = IMAGE_CASES[case]
    image_bytes = make_bytes()
    eager = data.decode_image(tf.constant(image_bytes))
    mapped = next(iter(tf.data.Dataset.from_tensors(image_bytes).map(data.decode_image)))
    for image in (eager, mapped):
        assert image.dtype == tf.uint8 and image.shape == (6, 8, 3)
        assert np.abs(image.numpy().astype(int) - expected).max() <= tolerance


def test_preprocess_eval_centre_crop_keeps_the_centre():
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:] = BLUE
    pixels[4:12, 4:12] = RED
    # crop_fraction 0.5: shorter side round(8 / 0.5) = 16 (no resize), then the central 8 x 8.
    output = data.preprocess_eval(pixels, 8, **UNIT, crop_fraction=0.5).numpy()
    assert output.shape == (8, 8, 3) and output.dtype == np.float32
    np.testing.assert_allclose(output, np.broadcast_to(np.array(RED) / 255, (8, 8, 3)), atol=1e-6)
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:] = BLUE
    wide[:, 4:12] = GREEN
    np.testing.assert_allclose(data.preprocess_eval(wide, 8, **UNIT, crop_fraction=1.0),
                               np.broadcast_to(np.array(GREEN) / 255, (8, 8, 3)), atol=1e-6)


def test_preprocess_eval_resizes_the_shorter_side_then_crops():
    # A 40 x 60 horizontal ramp; image_size 16 at crop 0.8 resizes to 20 x 30 and crops columns 7..22,
    # so the first output column samples the original at x = 7.5 / 30 * 60 = 15 (pixel centres at i + 0.5).
    ramp = np.broadcast_to(np.linspace(0, 255, 60, dtype=np.float32)[None, :, None], (40, 60, 3))
    output = data.preprocess_eval(ramp, 16, **UNIT, crop_fraction=0.8).numpy() * 255
    assert output.shape == (16, 16, 3)
    np.testing.assert_allclose(output[:, 0], (15 - 0.5) / 59 * 255, atol=1.0)
    np.testing.assert_allclose(output[:, -1], (22.5 / 30 * 60 - 0.5) / 59 * 255, atol=1.0)


def test_preprocess_eval_normalises():
    constant = np.full((20, 30, 3), 200, np.uint8)
    output = data.preprocess_eval(constant, 16, MEAN, STD).numpy()
    expected = (200 / 255 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(output, np.broadcast_to(expected, (16, 16, 3)), rtol=1e-5)


def test_preprocess_eval_same_in_dataset_map_and_with_dynamic_shapes():
    image = np.random.default_rng(0).integers(0, 256, (37, 51, 3), dtype=np.uint8)
    eager = data.preprocess_eval(image, 24, MEAN, STD)
    mapped = next(iter(
        tf.data.Dataset.from_tensors(_encode(image, "PNG"))
        .map(lambda image_bytes: data.preprocess_eval(data.decode_image(image_bytes), 24, MEAN, STD))))
    serving = tf.function(lambda x: data.preprocess_eval(x, 24, MEAN, STD),
                          input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    np.testing.assert_allclose(mapped, eager, atol=1e-5)
    np.testing.assert_allclose(serving(image), eager, atol=1e-5)
    assert serving(image[:20]).shape == (24, 24, 3)


# ----------------------------------------------------------------------------- make_dataset


def test_shapes_dtypes_and_remainders(synthetic):
    records = data.find_records(synthetic)  # 18 images
    common = dict(image_size=32, batch_size=4, mean=MEAN, std=STD)
    training = _take_numpy(data.make_dataset(records.paths, records.labels, training=True, **common))
    evaluation = _take_numpy(data.make_dataset(records.paths, records.labels, training=False, **common))
    assert [images.shape for images, _ in training] == [(4, 32, 32, 3)] * 4  # remainder of 2 dropped
    assert [images.shape for images, _ in evaluation] == [(4, 32, 32, 3)] * 4 + [(2, 32, 32, 3)]
    for images, labels in training + evaluation:
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert np.isfinite(images).all()
    np.testing.assert_array_equal(np.concatenate([labels for _, labels in evaluation]), records.labels)


def test_eval_is_deterministic_and_ordered(synthetic):
    records = data.find_records(synthetic)
    make = lambda: _take_numpy(data.make_dataset(records.paths, records.labels, image_size=32, batch_size=5,
                                                 training=False, mean=MEAN, std=STD))
    first, again = make(), make()
    for (images, labels), (images_again, labels_again) in zip(first, again):
        np.testing.assert_array_equal(images, images_again)
        np.testing.assert_array_equal(labels, labels_again)
    single = data.preprocess_eval(data.decode_image(tf.io.read_file(records.paths[6])), 32, MEAN, STD)
    np.testing.assert_allclose(first[1][0][1], single, atol=1e-5)  # 7th file is batch 1, row 1


def test_training_is_reproducible_per_seed_and_varies_per_epoch(synthetic, tmp_path):
    records = data.find_records(synthetic)

    def pipeline(seed, augmentation):
        return data.make_dataset(records.paths, records.labels, image_size=32, batch_size=6, training=True,
                                 mean=MEAN, std=STD, seed=seed, augmentation=augmentation)

    first, again, other = (
        _take_numpy(pipeline(seed, build_augmentation(seed=seed)), 1)[0] for seed in (0, 0, 1))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.allclose(first[0], other[0])

    def epochs(augmentation=None, **which):
        return _take_numpy(data.make_dataset(records.paths, records.labels, image_size=32, batch_size=6,
                                             training=True, mean=MEAN, std=STD, augmentation=augmentation, **which))

    # Without augmentation: the file order is reshuffled each epoch ...
    batches = epochs(num_epochs=2)
    steps = len(records.paths) // 6
    epoch_one, epoch_two = batches[:steps], batches[steps:]
    labels_one, labels_two = (np.concatenate([l for _, l in epoch]) for epoch in (epoch_one, epoch_two))
    assert not np.array_equal(labels_one, labels_two) and sorted(labels_one) == sorted(labels_two)
    # ... keyed by the epoch: a pipeline starting at epoch 1 (a resumed run) gives epoch 1's batches exactly,
    # augmentation and caches included ...
    for augmentation, cache in ((None, None), (build_augmentation(seed=0), None), (None, "memory"),
                                (build_augmentation(seed=0), str(tmp_path / "cache"))):
        both = epochs(augmentation, num_epochs=2, cache=cache)
        resumed = epochs(augmentation, first_epoch=1, cache=cache)
        for (images, labels), (images_again, labels_again) in zip(both[steps:], resumed, strict=True):
            np.testing.assert_array_equal(images, images_again)
            np.testing.assert_array_equal(labels, labels_again)
    # ... and one file is cropped differently per element and per epoch.
    one_file = data.make_dataset([records.paths[0]] * 4, [0] * 4, image_size=32, batch_size=4, training=True,
                                 mean=MEAN, std=STD, num_epochs=2)
    (crops_one, _), (crops_two, _) = _take_numpy(one_file)
    assert not np.allclose(crops_one[0], crops_one[1])
    assert not np.allclose(crops_one, crops_two)


@pytest.mark.parametrize("cache", [None, "memory", "file"])
def test_training_labels_follow_their_images(colour_folders, cache, tmp_path):
    assert colour_folders.class_names == ["blue", "green", "red"]
    cache = str(tmp_path / "cache" / "train") if cache == "file" else cache
    dataset = data.make_dataset(colour_folders.paths, colour_folders.labels, image_size=16, batch_size=3,
                                training=True, cache=cache, shuffle_buffer=4, **UNIT)
    batches = _take_numpy(dataset)
    assert len(batches) == 3
    colours = np.array([BLUE, GREEN, RED]) / 255
    for images, labels in batches:
        for image, label in zip(images, labels):
            np.testing.assert_allclose(image.mean(axis=(0, 1)), colours[label], atol=0.03)
    assert sorted(np.concatenate([labels for _, labels in batches])) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_eval_caches_match_no_cache(colour_folders, tmp_path):
    def batches(cache):
        dataset = data.make_dataset(colour_folders.paths, colour_folders.labels, image_size=16, batch_size=4,
                                    training=False, cache=cache, mean=MEAN, std=STD)
        return _take_numpy(dataset)

    reference = batches(None)
    file_prefix = str(tmp_path / "cache" / "val")
    for cache in ("memory", file_prefix, file_prefix):  # the second file run reads the cache back
        for (images, labels), (expected_images, expected_labels) in zip(batches(cache), reference):
            np.testing.assert_array_equal(images, expected_images)
            np.testing.assert_array_equal(labels, expected_labels)
    assert any(name.startswith("val_eval_16px_") for name in os.listdir(tmp_path / "cache"))


def test_bad_arguments_are_reported(colour_folders):
    paths, labels = colour_folders.paths, colour_folders.labels
    common = dict(image_size=16, mean=MEAN, std=STD)
    with pytest.raises(data.DataError, match="no full batch"):
        data.make_dataset(paths, labels, batch_size=64, training=True, **common)
    with pytest.raises(data.DataError, match="one label per path"):
        data.make_dataset(paths, labels[:-1], batch_size=2, training=False, **common)
    with pytest.raises(data.DataError, match="std must hold 3 values"):
        data.make_dataset(paths, labels, batch_size=2, training=False, image_size=16, mean=MEAN,
                          std=(0.2, 0.2))


def test_real_dog_photos(dogs10_dir):
    """The shared photos (conftest's dogs10_dir fails, never skips, when they are absent)."""
    records = data.find_records(dogs10_dir)
    assert records.layout == "folders" and len(records.class_names) == 10
    chosen = [i for label in (0, 1) for i in np.flatnonzero(records.labels == label)[:3]]
    paths, labels = [records.paths[i] for i in chosen], records.labels[chosen]
    common = dict(image_size=64, batch_size=4, mean=MEAN, std=STD)
    training = _take_numpy(
        data.make_dataset(paths, labels, training=True, augmentation=build_augmentation(), **common))
    evaluation = _take_numpy(data.make_dataset(paths, labels, training=False, **common))
    assert [images.shape for images, _ in training] == [(4, 64, 64, 3)]
    assert [images.shape for images, _ in evaluation] == [(4, 64, 64, 3), (2, 64, 64, 3)]
    for images, _ in training + evaluation:
        # Normalised photos: finite, centred near 0, spread near 1 (not blank, not saturated).
        assert np.isfinite(images).all() and abs(images.mean()) < 1.5 and 0.3 < images.std() < 2.5
    np.testing.assert_array_equal(np.concatenate([l for _, l in evaluation]), labels)
