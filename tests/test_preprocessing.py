"""One preprocessing record per weights: resolved once, recorded, read back, applied as the reference does."""

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import pil_eval_transform, reference_image
from test_inference import with_trained_statistics

from tfdogs import data, models, weights
from tfdogs.data import pipeline
from tfdogs.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from tfdogs.runs import folder as run_folder
from tfdogs.serving import saved_model
from tfdogs.weights import WeightsError

TIMM = Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, 0.95, "bicubic", "floor")
TORCHVISION = Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, 0.875, "bilinear", "round")


def test_registry_weights_bring_their_own_record():
    assert weights.resolve_preprocessing("imagenet", "resnet18", 224) == TORCHVISION
    assert weights.resolve_preprocessing("timm", "resnet34", 224) == TIMM
    assert TORCHVISION.resize_size == 256  # torchvision's IMAGENET1K_V1: Resize(256), CenterCrop(224)
    assert TIMM.resize_size == 235  # timm: math.floor(224 / 0.95), not round's 236
    assert weights.resolve_preprocessing(None, "lenet5", 32) == TORCHVISION.replace(image_size=32)
    assert Preprocessing.from_dict(TIMM.as_dict()) == TIMM
    with pytest.raises(ValueError, match="resize_rounding"):
        TIMM.replace(resize_rounding="ceil")


def test_a_checkpoint_file_is_recognised_by_its_hash_or_declared(tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "renamed-download.safetensors"
    checkpoint.write_bytes(b"the bytes of timm's resnet18.a1_in1k")
    entry = weights.REGISTRY[("resnet18", "timm")]
    monkeypatch.setitem(weights.REGISTRY, ("resnet18", "timm"), entry.__class__(
        **{**entry.__dict__, "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}))
    assert weights.resolve_preprocessing(str(checkpoint), "resnet18", 64) == TIMM.replace(image_size=64)
    assert capsys.readouterr().out == ""
    with pytest.raises(WeightsError, match="weights_preprocessing is 'torchvision'.*timm"):
        weights.resolve_preprocessing(str(checkpoint), "resnet18", 64, "torchvision")

    unknown = tmp_path / "fine-tuned-elsewhere.safetensors"
    unknown.write_bytes(b"other bytes")
    assert weights.resolve_preprocessing(str(unknown), "resnet18", 64) == TORCHVISION.replace(image_size=64)
    assert "assuming torchvision's" in capsys.readouterr().out  # the assumption is said, not silent
    assert weights.resolve_preprocessing(str(unknown), "resnet18", 64, "timm") == TIMM.replace(image_size=64)


# Pixels agree exactly (tfdogs reproduces Pillow's fixed-point resampling); what remains is float32
# normalisation against float64 here: at most 3.65e-7 over all 210 photos of dogs10 and the three records
# below. TensorFlow's and Pillow's JPEG decoders differ by up to 4 levels on these photos (TF's default DCT
# is INTEGER_FAST), so both sides start from Pillow's decode.
PARITY_ATOL = 5e-7
RECORDS = [TIMM, TORCHVISION, TIMM.replace(image_size=64)]
RECORD_NAMES = ["timm", "torchvision", "timm-64px"]


def assert_matches_the_pil_reference(paths, record):
    """Every photo, eagerly and inside Dataset.map, against `pil_eval_transform`; names the worst photo."""
    pixels = [np.asarray(reference_image(path)) for path in paths]
    mapped = tf.data.Dataset.from_generator(lambda: iter(pixels), output_signature=tf.TensorSpec(
        [None, None, 3], tf.uint8)).map(lambda image: data.preprocess_eval(image, **record.as_dict()))
    worst = (0.0, None)
    for path, image, in_map in zip(paths, pixels, mapped):
        expected = pil_eval_transform(path, record)
        eager = data.preprocess_eval(image, **record.as_dict()).numpy()
        worst = max(worst, (float(np.abs(eager - expected).max()), path.name),
                    (float(np.abs(in_map.numpy() - expected).max()), path.name + " (in Dataset.map)"))
    assert worst[0] < PARITY_ATOL, f"{worst[1]}: {worst[0]:.3g} from the PIL reference"


@pytest.mark.parametrize("record", RECORDS, ids=RECORD_NAMES)
def test_eval_preprocessing_matches_the_pil_reference_on_real_photos(dogs10_dir, record):
    """One photo of each of three breeds; the slow tier checks all 210."""
    paths = sorted(dogs10_dir.glob("*/*.jpg"))[::80]
    assert len(paths) == 3, f"expected dogs10's 210 photos in {dogs10_dir}"
    assert_matches_the_pil_reference(paths, record)


def test_kept_evaluation_crops_are_the_pil_reference_and_later_passes_read_no_photo(dogs10_dir, tmp_path,
                                                                                     monkeypatch):
    """A run's validation pipeline (`keep_crops`): the same pixels every pass, the photos read once."""
    record = TORCHVISION.replace(image_size=64)
    paths = [pathlib.Path(shutil.copy(path, tmp_path / f"{i}.jpg"))
             for i, path in enumerate(sorted(dogs10_dir.glob("*/*.jpg"))[::45])]
    labels = np.arange(len(paths)) % 3

    def images(keep=True):
        dataset = data.make_dataset(paths, labels, training=False, batch_size=2, keep_crops=keep, **record.as_dict())
        return np.concatenate([batch.numpy() for batch, _ in dataset])

    first = images()
    # TensorFlow's JPEG decode on both sides; the rest (Pillow's resize, the crop, float32 normalisation)
    # agrees to float rounding
    expected = np.stack([pil_eval_transform(path, record, decoder="tensorflow") for path in paths])
    np.testing.assert_allclose(first, expected, atol=PARITY_ATOL, rtol=0)
    np.testing.assert_array_equal(first, images(keep=False))
    kept = data.make_dataset(paths, labels, training=False, batch_size=2, keep_crops=True, **record.as_dict())
    before = np.concatenate([batch.numpy() for batch, _ in kept])
    for path in paths:
        path.unlink()
    np.testing.assert_array_equal(np.concatenate([batch.numpy() for batch, _ in kept]), before)  # no photo read
    monkeypatch.setattr(pipeline, "KEPT_CROPS_BYTES", len(paths) * 3 * 64 ** 2 - 1)  # one byte short: not kept
    with pytest.raises(tf.errors.NotFoundError):
        images()


@pytest.mark.slow
@pytest.mark.parametrize("record", RECORDS, ids=RECORD_NAMES)
def test_eval_preprocessing_matches_the_pil_reference_on_every_dogs10_photo(dogs10_dir, record):
    """About 40 s per record on 2 shared cores."""
    paths = sorted(dogs10_dir.glob("*/*.jpg"))
    assert len(paths) == 210, f"expected dogs10's 210 photos in {dogs10_dir}, found {len(paths)}"
    assert_matches_the_pil_reference(paths, record)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_the_pipelines_pillow_resize_gives_the_exports_in_graph_pixels(interpolation):
    """make_dataset resizes with Pillow itself, the SavedModel in its graph: the two must never differ."""
    rng = np.random.default_rng(0)
    shapes = [(375, 500), (500, 333), (257, 257), (19, 30), (1001, 77)]  # landscape, portrait, square, enlarged, long
    images = [rng.integers(0, 256, shape + (3,), dtype=np.uint8) for shape in shapes]
    images.append(rng.uniform(-20, 280, (90, 120, 3)).astype(np.float32))  # float input: rounded and clipped first
    for image in images:
        for record in (TORCHVISION.replace(interpolation=interpolation, image_size=64), TIMM.replace(image_size=32)):
            settings = {**record.as_dict(), "interpolation": interpolation}
            in_graph = data.preprocess_eval(image, **settings).numpy()
            mapped = next(iter(tf.data.Dataset.from_tensors(image).map(
                lambda pixels, settings=settings: data.preprocess_eval(pixels, **settings, with_pillow=True),
                2))).numpy()
            np.testing.assert_array_equal(mapped, in_graph)
            np.testing.assert_array_equal(data.eval_views(image, 10, **settings, with_pillow=True).numpy(),
                                          data.eval_views(image, 10, **settings).numpy())
    with pytest.raises(data.DataError, match="interpolation"):
        data.preprocess_eval(images[0], 32, IMAGENET_MEAN, IMAGENET_STD, interpolation="nearest", with_pillow=True)


def test_eval_cache_key_holds_every_preprocessing_field(tmp_path):
    paths = sorted(str(path) for path in data.make_synthetic(tmp_path / "photos", num_classes=2,
                                                             images_per_class=2, image_size=64).glob("train/*"))
    prefix = str(tmp_path / "cache" / "val")
    variants = [dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", resize_rounding="round"),
                dict(mean=(0.5, 0.5, 0.5), std=IMAGENET_STD, interpolation="bilinear", resize_rounding="round"),
                dict(mean=IMAGENET_MEAN, std=(0.5, 0.5, 0.5), interpolation="bilinear", resize_rounding="round"),
                dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic", resize_rounding="round"),
                dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", resize_rounding="floor")]

    def images(cache, settings):
        dataset = data.make_dataset(paths, np.zeros(len(paths)), image_size=32, batch_size=4, training=False,
                                    crop_fraction=0.95, cache=cache, **settings)
        return next(iter(dataset))[0].numpy()

    seen = []
    for settings in variants:
        cached = images(prefix, settings)
        np.testing.assert_array_equal(cached, images(None, settings))  # not another setting's cache
        assert not any(np.array_equal(cached, other) for other in seen)
        seen.append(cached)


# Runs with TensorFlow alone: prints the export's probabilities and how many BatchNorm statistics it holds.
TF_ONLY_SERVING_IMAGES = """
import json, sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
images = tf.constant(np.load(sys.argv[2]))
probabilities = loaded.signatures["serving_images"](images=images)["probabilities"].numpy()
assert "tfdogs" not in sys.modules
statistics = [v.name for v in loaded.variables if "moving_mean" in v.name or "moving_variance" in v.name]
print(json.dumps({"probabilities": probabilities.tolist(), "batch_norm_statistics": len(statistics)}))
"""


def serve_in_fresh_process(version_dir, images, tmp_path):
    np.save(tmp_path / "images.npy", images)
    result = subprocess.run([sys.executable, "-c", TF_ONLY_SERVING_IMAGES, str(version_dir),
                             str(tmp_path / "images.npy")], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def keras_probabilities(model, images, record):
    """The float32 Keras model's softmax on the record's evaluation preprocessing, in process."""
    inputs = np.stack([data.preprocess_eval(image, **record.as_dict()).numpy() for image in images])
    return tf.nn.softmax(model(inputs, training=False), axis=-1).numpy()


def test_export_folds_batch_norms_and_serves_the_models_probabilities(tmp_path):
    keras.utils.set_random_seed(0)
    first = with_trained_statistics(models.build("resnet18", 5, input_shape=(64, 64, 3)), seed=1)
    second = with_trained_statistics(models.build("resnet18", 5, input_shape=(48, 48, 3)), seed=2)
    records = [TORCHVISION.replace(image_size=64), TIMM.replace(image_size=48)]
    images = np.random.default_rng(3).integers(0, 256, (3, 80, 96, 3)).astype("float32")
    class_names = ["a", "b", "c", "d", "e"]

    single = saved_model.export_saved_model(first, class_names, tmp_path / "single", preprocessing=records[0])
    served = serve_in_fresh_process(single, images, tmp_path)
    assert served["batch_norm_statistics"] == 0  # folded: the graph differs from the model's
    np.testing.assert_allclose(served["probabilities"], keras_probabilities(first, images, records[0]), atol=1e-5)
    assert saved_model.read_metadata(single)["preprocessing"] == records[0].as_dict()

    pair = saved_model.export_saved_model([first, second], class_names, tmp_path / "ensemble", preprocessing=records,
                                     model_weights=[1, 3])
    served = serve_in_fresh_process(pair, images, tmp_path)
    assert served["batch_norm_statistics"] == 0
    expected = (0.25 * keras_probabilities(first, images, records[0])
                + 0.75 * keras_probabilities(second, images, records[1]))
    np.testing.assert_allclose(served["probabilities"], expected, atol=1e-5)
    facts = saved_model.read_metadata(pair)
    assert facts["preprocessing"] is None and facts["member_preprocessing"] == [r.as_dict() for r in records]


def test_tools_read_the_record_of_the_run_folder(lenet_run, tmp_path):
    recorded = Preprocessing.load(lenet_run / "preprocessing.json")
    assert recorded == TORCHVISION.replace(image_size=32)
    assert saved_model.read_metadata(json.loads((lenet_run / "metrics.json").read_text())["export"])[
        "preprocessing"] == recorded.as_dict()

    # A record that no name would give: the tools must follow the file, not the config's weights.
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.yaml", "split.csv", "model.keras", "metrics.json"):
        shutil.copy(lenet_run / name, copy / name)
    other = recorded.replace(crop_fraction=0.5, interpolation="bicubic", resize_rounding="floor")
    other.save(copy / "preprocessing.json")
    run = run_folder.load_run(copy)
    assert run.preprocessing == other
    records, _, val_indices = run_folder.load_run(lenet_run).split()
    paths = [records.paths[i] for i in val_indices[:4]]
    model = run.load_model()
    np.testing.assert_allclose(
        run_folder.predict_paths(model, paths, run.preprocessing),
        tf.nn.softmax(model(np.stack([data.preprocess_eval(data.decode_image(tf.io.read_file(path)),
                                                           **other.as_dict()) for path in paths]))).numpy(),
        atol=1e-6)

    (copy / "preprocessing.json").write_text("{}")
    with pytest.raises(run_folder.RunFolderError, match="preprocessing.json"):
        run_folder.load_run(copy)
