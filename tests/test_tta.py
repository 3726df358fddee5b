"""Test-time augmentation: the views of `data.eval_views`, and evaluate, predict, submit and export averaging them."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from tfdogs import data, export, predict, submit
from tfdogs.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from tfdogs.evaluation import predictions as predictions_lib
from tfdogs.runs import folder as run_folder, predictor, submission
from tfdogs.serving import saved_model

# Resized shorter side floor(16 / 0.7) = 22: a 37 x 53 photo becomes 22 x 31, margins 6 and 15 (odd).
RECORD = Preprocessing(image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_fraction=0.7,
                       interpolation="bicubic", resize_rounding="floor")


def photo(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def mirrored_after_each(crops):
    return [view for crop in crops for view in (crop, crop[:, ::-1])]


def assert_same_answers(actual, expected, atol=1e-5):
    """Equal to `atol`, and each probability to 0.1 % of itself: the LeNet run answers most photos with
    probabilities near 0 and 1, where only the relative size of the small ones tells answers apart."""
    np.testing.assert_allclose(actual, expected, atol=atol)
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-30)


def differ(first, second):
    return not np.allclose(first, second, rtol=1e-2, atol=1e-30)


def val_paths(run_dir, count=6):
    run = run_folder.load_run(run_dir)
    records, _, val_indices = run.split()
    return run, [records.paths[i] for i in val_indices[:count]]


@pytest.mark.parametrize("views", [1, 2, 10])
def test_views_are_equal_eagerly_and_inside_dataset_map(views):
    image = photo(37, 53)
    eager = data.eval_views(tf.constant(image), views, **RECORD.as_dict()).numpy()
    mapped = next(iter(tf.data.Dataset.from_tensors(image).map(
        lambda pixels: data.eval_views(pixels, views, **RECORD.as_dict())))).numpy()
    assert eager.shape == (views, 16, 16, 3) and eager.dtype == np.float32
    np.testing.assert_array_equal(eager, mapped)
    # view 0 is the evaluation crop, bit for bit; each count's views begin with the smaller count's
    np.testing.assert_array_equal(eager[0], data.preprocess_eval(tf.constant(image), **RECORD.as_dict()).numpy())
    ten = data.eval_views(tf.constant(image), 10, **RECORD.as_dict()).numpy()
    np.testing.assert_array_equal(ten[:views], eager)
    if views > 1:
        np.testing.assert_array_equal(eager[1], eager[0][:, ::-1])


def test_other_view_counts_are_refused():
    with pytest.raises(data.DataError, match="1, 2, 10 views; got 5"):
        data.eval_views(tf.constant(photo(20, 20)), 5, **RECORD.as_dict())
    with pytest.raises(data.DataError, match="views are test-time augmentation"):
        data.make_dataset(["a.jpg"], [0], training=True, batch_size=1, views=2, **RECORD.as_dict())


@pytest.mark.parametrize("height, width", [(37, 53), (53, 37)])
def test_the_ten_views_are_the_centre_and_the_corners_of_the_resized_image(height, width):
    image = photo(height, width, seed=height)
    # By hand: torchvision's Resize(22) with Pillow (longer side truncated), then numpy crops.
    shorter, longer = min(height, width), max(height, width)
    new_longer = int(RECORD.resize_size * longer / shorter)
    size = (new_longer, RECORD.resize_size) if width > height else (RECORD.resize_size, new_longer)
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC), np.float32)
    rows, columns, crop = resized.shape[0], resized.shape[1], RECORD.image_size
    top, left = round((rows - crop) / 2), round((columns - crop) / 2)  # torchvision's CenterCrop offsets
    centre = resized[top:top + crop, left:left + crop]
    top_left, top_right = resized[:crop, :crop], resized[:crop, columns - crop:]
    bottom_left, bottom_right = resized[rows - crop:, :crop], resized[rows - crop:, columns - crop:]
    expected = mirrored_after_each([centre, top_left, top_right, bottom_left, bottom_right])

    views = data.eval_views(tf.constant(image), 10, **RECORD.as_dict()).numpy()
    pixels = np.round(views * np.float32(255) * np.float32(RECORD.std) + np.float32(255) * np.float32(RECORD.mean))
    assert len({view.tobytes() for view in expected}) == 10  # ten different crops: the check can tell them apart
    for name, view, by_hand in zip(data.TTA_VIEWS[10], pixels, expected):
        np.testing.assert_array_equal(view, by_hand, err_msg=name)


def test_one_view_is_no_tta_exactly(lenet_run):
    run, paths = val_paths(lenet_run, count=16)
    model = run.load_model()
    plain = predictions_lib.predict_probabilities(model, data.make_dataset(
        paths, np.zeros(len(paths)), training=False, batch_size=32, **run.preprocessing.as_dict()))
    np.testing.assert_array_equal(run_folder.predict_paths(model, paths, run.preprocessing, tta=1), plain)
    assert differ(run_folder.predict_paths(model, paths, run.preprocessing, tta=2), plain)


def test_two_views_average_the_softmax_of_the_crop_and_of_its_mirror(lenet_run):
    run, paths = val_paths(lenet_run, count=16)
    model = run.load_model()
    crops = np.concatenate([images for images, _ in data.make_dataset(
        paths, np.zeros(len(paths)), training=False, batch_size=32, **run.preprocessing.as_dict())])
    crop_probabilities = tf.nn.softmax(model.predict(crops, verbose=0)).numpy()
    mirror_probabilities = tf.nn.softmax(model.predict(crops[:, :, ::-1], verbose=0)).numpy()
    assert_same_answers(run_folder.predict_paths(model, paths, run.preprocessing, tta=2, batch_size=5),
                        (crop_probabilities + mirror_probabilities) / 2, atol=1e-6)
    assert differ(crop_probabilities, mirror_probabilities)


SERVE = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    blobs = [open(path, "rb").read() for path in sys.argv[2:]]
    from_bytes = loaded.signatures["serving_default"](image_bytes=tf.constant(blobs))
    pixels = tf.cast(tf.io.decode_image(blobs[0], channels=3, expand_animations=False), tf.float32)[None]
    from_images = loaded.signatures["serving_images"](images=pixels)
    shapes = {name: str(signature.structured_outputs["probabilities"].shape)
              for name, signature in loaded.signatures.items()}
    print(json.dumps({"signatures": sorted(loaded.signatures), "outputs": sorted(from_bytes), "shapes": shapes,
                      "probabilities": from_bytes["probabilities"].numpy().tolist(),
                      "first_from_images": from_images["probabilities"].numpy().tolist(),
                      "tfdogs_imported": any(name.startswith("tfdogs") for name in sys.modules)}))
""")


def test_an_export_with_ten_views_answers_what_evaluation_does_in_a_tensorflow_only_process(
        lenet_run, tmp_path, capsys):
    run, paths = val_paths(lenet_run)
    assert export.main([str(lenet_run), "--tta", "10", "--output", str(tmp_path / "saved")]) == 0
    version_dir = tmp_path / "saved" / "1"
    facts = saved_model.read_metadata(version_dir)
    assert facts["tta_views"] == 10 and facts["tta_view_names"] == list(data.TTA_VIEWS[10])

    served = json.loads(subprocess.run([sys.executable, "-c", SERVE, str(version_dir), *map(str, paths)],
                                       capture_output=True, text=True, check=True).stdout)
    assert served["signatures"] == ["serving_default", "serving_images"] and not served["tfdogs_imported"]
    assert served["outputs"] == ["probabilities", "top5_breeds", "top5_probabilities"]
    assert served["shapes"] == {"serving_default": "(None, 4)", "serving_images": "(None, 4)"}
    model = run.load_model()
    expected = run_folder.predict_paths(model, paths, run.preprocessing, tta=10)
    assert_same_answers(served["probabilities"], expected)
    assert_same_answers(served["first_from_images"], expected[:1])
    assert differ(expected, run_folder.predict_paths(model, paths, run.preprocessing, tta=1))
    assert differ(expected, run_folder.predict_paths(model, paths, run.preprocessing, tta=2))

    # the SavedModel answers with its own views; another count is refused, and TFLite takes none
    assert predictor.load_predictor(version_dir).views == 10
    with pytest.raises(predictor.PredictError, match="answers with 10 view.*not 2.*--tta 2"):
        predictor.load_predictor(version_dir, tta=2)
    capsys.readouterr()
    assert export.main([str(lenet_run), "--format", "tflite", "--tta", "10", "--output", str(tmp_path / "t")]) == 2
    assert "--tta 10 is for SavedModel exports only" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_predict_and_submit_with_two_views_answer_the_mean_of_the_views(lenet_run, tmp_path, capsys):
    run, paths = val_paths(lenet_run, count=4)
    model = run.load_model()

    def predicted(*flags):
        capsys.readouterr()
        assert predict.main([str(lenet_run), *map(str, paths), "--json", "--verbose", "0", *flags]) == 0
        answers = json.loads(capsys.readouterr().out)
        # four breeds: the top 5 are all of them
        return np.array([[{entry["breed"]: entry["probability"] for entry in answer["top5"]}[breed]
                          for breed in run.class_names] for answer in answers])

    two, one = predicted("--tta", "2"), predicted("--tta", "1")
    assert_same_answers(two, run_folder.predict_paths(model, paths, run.preprocessing, tta=2))
    assert_same_answers(one, run_folder.predict_paths(model, paths, run.preprocessing, tta=1))
    assert differ(two, one)

    kaggle = lenet_run / "synthetic_data"
    ids, breed_columns, test_paths = submission.read_sample_submission(kaggle)
    tables = {}
    for views in ("1", "2"):
        output = tmp_path / f"submission-tta{views}.csv"
        assert submit.main([str(lenet_run), "--data-dir", str(kaggle), "--output", str(output),
                            "--verbose", "0", "--tta", views]) == 0
        tables[views] = pd.read_csv(output)
    expected = run_folder.predict_paths(model, test_paths, run.preprocessing, tta=2)
    order = [run.class_names.index(breed) for breed in breed_columns]
    assert tables["2"]["id"].tolist() == ids
    assert_same_answers(tables["2"][breed_columns].to_numpy(), expected[:, order])
    assert differ(tables["2"][breed_columns].to_numpy(), tables["1"][breed_columns].to_numpy())
