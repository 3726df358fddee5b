""""Not a dog": the threshold, the score in the SavedModel, predict's answers, and the rates on real photos.

The references here are NumPy written out in each test (cosine similarities, sorted scores), and the
pooled features come from the unfolded Keras model, not from the serving graph under test.
"""

import io
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import small_config
from PIL import Image

from tfdogs import data, models, predict
from tfdogs.data import non_dogs
from tfdogs.data.preprocessing import Preprocessing
from tfdogs.evaluation import not_a_dog
from tfdogs.serving import saved_model
from tfdogs.training import loop as training_loop

RECORD = Preprocessing(image_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_fraction=0.875)


def reference_scores(features, means):
    """Cosine similarity of each row to each mean, the highest, with nothing but NumPy."""
    out = []
    for row in np.asarray(features, np.float64):
        out.append(max(float(row @ mean) / (np.linalg.norm(row) * np.linalg.norm(mean)) for mean in means))
    return np.array(out)


@pytest.mark.parametrize("count", [1, 10, 41, 100, 101, 250, 1000])
def test_the_threshold_is_the_highest_that_keeps_99_percent(count):
    scores = np.random.default_rng(count).normal(size=count)
    threshold = not_a_dog.keep_threshold(scores)
    assert np.mean(scores >= threshold) >= 0.99
    higher = np.sort(scores)[np.sort(scores) > threshold]
    assert higher.size == 0 or np.mean(scores >= higher[0]) < 0.99  # the next score up would keep fewer


def test_scores_are_the_cosine_to_the_nearest_breed_mean():
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(60, 16)) + 0.5, np.repeat(np.arange(3), 20)
    means = not_a_dog.breed_means(features, labels, 3)
    reference_means = [features[labels == index].mean(axis=0) for index in range(3)]
    other = rng.normal(size=(7, 16))
    np.testing.assert_allclose(not_a_dog.dog_scores(other, means), reference_scores(other, reference_means),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        not_a_dog.breed_means(features[:40], labels[:40], 3)


def pixels_of(images, record):
    return np.stack([data.preprocess_eval(tf.constant(image), **record.as_dict()).numpy() for image in images])


@pytest.fixture(scope="module")
def gated_export(tmp_path_factory):
    """A ResNet-18 at 64 px with a gate fitted on random photos, exported with a second, ungated member."""
    keras.utils.set_random_seed(0)
    model = models.build("resnet18", 3, input_shape=(64, 64, 3))
    backbone = keras.Model(model.inputs, model.get_layer("avgpool").output)
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, size=(80 + 4 * index, 90, 3), dtype=np.uint8) for index in range(9)]
    features = backbone.predict(pixels_of(photos, RECORD), verbose=0)
    gate = not_a_dog.fit(features[:6], np.arange(6) % 3, features[6:], 3)
    base = tmp_path_factory.mktemp("gated")
    version = saved_model.export_saved_model([model, model], ["a", "b", "c"], base / "export",
                                             preprocessing=RECORD, gates=[gate, None])
    return model, backbone, gate, version


def test_the_saved_model_answers_the_dog_score_of_its_gated_members(gated_export):
    model, backbone, gate, version = gated_export
    rng = np.random.default_rng(1)
    photos = [rng.integers(0, 256, size=(70, 100, 3), dtype=np.uint8) for _ in range(4)]
    encoded = []
    for photo in photos:
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    served = tf.saved_model.load(str(version)).signatures["serving_default"](image_bytes=tf.constant(encoded))
    expected = reference_scores(backbone.predict(pixels_of(photos, RECORD), verbose=0), gate.breed_means)
    # the ungated member adds nothing to the dog score; folded BatchNorms differ by about 1e-6
    np.testing.assert_allclose(served["dog_score"].numpy(), expected, atol=1e-4)
    np.testing.assert_array_equal(served["not_a_dog"].numpy(), expected < gate.threshold)
    facts = saved_model.read_metadata(version)["not_a_dog"]
    assert facts["can_reject"] and facts["threshold"] == pytest.approx(gate.threshold)


def test_an_export_without_a_gate_has_no_dog_outputs_and_says_why(lenet_run, tmp_path):
    run_facts = json.loads((lenet_run / not_a_dog.FACTS_FILE).read_text())
    assert run_facts == {"can_reject": False, "why": run_facts["why"]} and "random weights" in run_facts["why"]
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(photo)
    completed = subprocess.run([sys.executable, "-m", "tfdogs.predict", str(lenet_run), str(photo), "--json"],
                               capture_output=True, text=True, check=True)
    answers = json.loads(completed.stdout)
    assert "not_a_dog" not in answers[0] and "dog_score" not in answers[0]
    assert "cannot say 'not a dog'" in completed.stderr and "random weights" in completed.stderr


# Measured by this test's run (EfficientNet-Lite0's real ImageNet weights on dogs10, 41 validation photos,
# seed 0, fine-tune 2 head + 2 whole epochs, float32; AMD EPYC, 2 cores), on the 19 photos of
# tfdogs.data.non_dogs: threshold 0.582 keeping all 41 validation dogs, 0 of 19 non-dogs accepted, highest
# non-dog score 0.387 (the threshold 1.50 times it). The margins allow one photo through, and a threshold
# down to 1.1 times the highest non-dog score.
MOST_NON_DOGS_ACCEPTED = 1
LOWEST_THRESHOLD_OVER_HIGHEST_NON_DOG = 1.1


@pytest.mark.slow
def test_a_lite0_run_rejects_real_non_dog_photos_and_keeps_the_dogs(dogs10_dir, tmp_path, capsys):
    config = small_config(
        model="efficientnet_lite0", weights="imagenet", data=None, data_dir=str(dogs10_dir), image_size=224,
        batch_size=32, learning_rate=1e-3, rotation=0.05, zoom=0.1, translation=0.1, contrast=0.1,
        crop_scale_min=0.25, strategy="fine-tune", head_init="random", epochs=4, head_epochs=2,
        output=str(tmp_path / "run"), export_dir=str(tmp_path / "export"))
    run_dir = training_loop.train(config)
    facts = json.loads((run_dir / "metrics.json").read_text())["not_a_dog"]
    assert facts["can_reject"] and facts["val_dogs"] == 41 and facts["val_dogs_rejected"] <= 0.01
    assert facts["non_dogs"] == len(non_dogs.descriptions()) == 19
    assert round(facts["non_dogs_accepted"] * 19) <= MOST_NON_DOGS_ACCEPTED
    assert facts["threshold"] >= LOWEST_THRESHOLD_OVER_HIGHEST_NON_DOG * facts["highest_non_dog_score"]

    # The SavedModel, fed the photos as PNG files, answers what training measured: in float32, to float32's
    # rounding; where the CPU computes bfloat16 natively the run measured on bfloat16 features, to its rounding.
    tolerance = 1e-4 if facts["precision"] == "float32" else 3e-3
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, photo in non_dogs.non_dog_photos().items():
        Image.fromarray(photo).save(photos / f"{name}.png")
    capsys.readouterr()
    assert predict.main([str(tmp_path / "export"), str(photos), "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)
    scores = [answer["dog_score"] for answer in answers]
    assert max(scores) == pytest.approx(facts["highest_non_dog_score"], abs=tolerance)
    assert sum(answer["not_a_dog"] for answer in answers) == 19 - round(facts["non_dogs_accepted"] * 19)


def test_submit_writes_each_test_photo_s_answer_beside_the_kaggle_csv(gated_export, tmp_path, capsys):
    from tfdogs import submit

    model, backbone, gate, version = gated_export
    rng = np.random.default_rng(2)
    photos = {f"id{index}": rng.integers(0, 256, size=(64 + 8 * index, 72, 3), dtype=np.uint8) for index in range(3)}
    (tmp_path / "kaggle" / "test").mkdir(parents=True)
    for image_id, photo in photos.items():
        Image.fromarray(photo).save(tmp_path / "kaggle" / "test" / f"{image_id}.jpg", quality=95)
    (tmp_path / "kaggle" / "sample_submission.csv").write_text("id,a,b,c\n" + "".join(
        f"{image_id},0.3,0.3,0.4\n" for image_id in photos))
    output = tmp_path / "submission.csv"
    assert submit.main([str(version), "--data-dir", str(tmp_path / "kaggle"), "--output", str(output)]) == 0
    assert output.read_text().splitlines()[0] == "id,a,b,c"  # Kaggle's columns, untouched
    answers = np.genfromtxt(tmp_path / "submission.not_a_dog.csv", delimiter=",", names=True, dtype=None,
                            encoding=None)
    # decoded as the SavedModel decodes JPEG (Pillow's IDCT differs by a level here and there)
    decoded = [tf.io.decode_jpeg((tmp_path / "kaggle" / "test" / f"{image_id}.jpg").read_bytes(), channels=3).numpy()
               for image_id in photos]
    expected = reference_scores(backbone.predict(pixels_of(decoded, RECORD), verbose=0), gate.breed_means)
    assert list(answers["id"]) == list(photos)
    np.testing.assert_allclose(answers["dog_score"], expected, atol=1e-4)
    assert list(answers["not_a_dog"]) == list(expected < gate.threshold)
    assert f"{int(np.sum(expected < gate.threshold))} of 3 test images score under the threshold" in capsys.readouterr().out
