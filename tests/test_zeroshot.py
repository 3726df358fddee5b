import json

import keras
import numpy as np
import pytest

from tfdogs import data, models, zeroshot
from tfdogs.data import breeds
from tfdogs.evaluation import metrics, zeroshot as zeroshot_lib
from tfdogs.training import loop as training_loop


def test_breed_probabilities_take_the_breeds_imagenet_logits():
    class_names = ["golden_retriever", "chihuahua", "dingo"]
    logits = np.random.default_rng(0).normal(size=(5, 1000)).astype("float32")
    probabilities = zeroshot_lib.breed_probabilities(logits, class_names)
    picked = logits[:, [207, 151, 273]]  # ImageNet: golden retriever, Chihuahua, dingo
    expected = np.exp(picked) / np.exp(picked).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5)


def test_a_breed_imagenet_splits_takes_the_sum_of_its_classes():
    logits = np.random.default_rng(1).normal(size=(4, 1000))
    probabilities = zeroshot_lib.breed_probabilities(logits, ["beagle", "poodle"])
    picked = np.exp(logits[:, [162, 265, 266, 267]])  # beagle; toy, miniature and standard poodle
    picked /= picked.sum(1, keepdims=True)
    np.testing.assert_allclose(probabilities, np.stack([picked[:, 0], picked[:, 1:].sum(1)], 1), rtol=1e-5)


def test_breeds_without_an_imagenet_class_are_named():
    with pytest.raises(ValueError, match="dachshund, bulldog"):
        zeroshot_lib.breed_columns(["beagle", "dachshund", "bulldog"])


def test_zero_shot_run_on_generated_breeds(tmp_path):
    data_dir = data.make_synthetic(tmp_path / "data", num_classes=4, images_per_class=6, image_size=64)
    keras.utils.set_random_seed(3)
    checkpoint = tmp_path / "imagenet-like.weights.h5"
    reference = models.build("resnet18", 1000, input_shape=(64, 64, 3))
    reference.save_weights(checkpoint)

    output = tmp_path / "zeroshot.json"
    assert zeroshot.main(["--model", "resnet18", "--weights", str(checkpoint), "--data-dir", str(data_dir),
                          "--subset", "all", "--image-size", "64", "--output", str(output)]) == 0
    result = json.loads(output.read_text())

    records = data.find_records(data_dir)
    dataset = data.make_dataset(records.paths, records.labels, image_size=64, batch_size=8, training=False,
                                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    logits = reference.predict(dataset.map(lambda images, labels: images), verbose=0)
    columns = [breeds.imagenet_index(name) for name in records.class_names]
    picked = logits[:, columns]
    probabilities = np.exp(picked - picked.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    assert result["num_images"] == 24 and result["num_classes"] == 4
    assert result["accuracy"] == pytest.approx(metrics.scores(probabilities, records.labels)["accuracy"])
    assert result["log_loss"] == pytest.approx(metrics.log_loss(probabilities, records.labels), rel=1e-4)


@pytest.mark.slow
def test_default_imagenet_run_downloads_weights_and_reports_the_zero_shot_baseline(tmp_path, monkeypatch):
    """The main command's path: `--weights` left at auto fetches the registry's checkpoint (here a local file)."""
    import dataclasses
    import hashlib

    import safetensors.numpy
    from conftest import small_config

    from tfdogs import weights
    from tfdogs.weights import port

    keras.utils.set_random_seed(5)
    reference = models.build("resnet18", 1000, input_shape=(64, 64, 3))
    state_dict = {}
    for key, (_, variable, layout) in port.torch_names(reference).items():
        value = np.array(variable)
        state_dict[key] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2 else value
    checkpoint = tmp_path / "resnet18-published.safetensors"
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, checkpoint)
    spec = dataclasses.replace(weights.REGISTRY[("resnet18", "torchvision")], url=checkpoint.as_uri(),
                               sha256=hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
                               file_name=checkpoint.name)
    monkeypatch.setitem(weights.REGISTRY, ("resnet18", "torchvision"), spec)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))

    # float32: on a CPU with native bfloat16 the run's frozen pass (and so its baseline) would be bfloat16's
    config = small_config(model="resnet18", weights="auto", strategy="auto", image_size=64, epochs=2,
                          head_epochs=1, precision="float32", output=str(tmp_path / "run"),
                          export_dir=str(tmp_path / "export"))
    assert config["weights"] == "imagenet" and config["strategy"] == "fine-tune"
    run_dir = training_loop.train(config)
    summary = json.loads((run_dir / "metrics.json").read_text())
    zero_shot = summary["baselines"]["imagenet_zero_shot"]
    assert json.loads((run_dir / "zeroshot.json").read_text()) == zero_shot
    assert zero_shot["num_images"] == summary["num_val"] and 0 <= zero_shot["accuracy"] <= 1
    assert (tmp_path / "keras_home" / "models" / "tfdogs" / checkpoint.name).is_file()

    # the figure in the run folder is reproduced by the zero-shot command on the same split
    config_records, _, val_indices = data.read_split(run_dir / "split.csv", str(run_dir / "synthetic_data"))
    expected = zeroshot_lib.evaluate_zero_shot("resnet18", config_records, val_indices, weights_source="imagenet",
                                           preprocessing=weights.REGISTRY[("resnet18", "torchvision")].preprocessing(64))
    assert zero_shot["log_loss"] == pytest.approx(expected["log_loss"], rel=1e-5)


def test_zero_shot_of_a_run_reproduces_its_training_baseline_from_a_checkpoint_file(tmp_path, monkeypatch):
    """A run from a local 1000-class checkpoint records the baseline, and `--run` redoes it with the run's settings.

    Training at 64 px, `--run` alone must use the run's model, weights, size and preprocessing record
    and give metrics.json's numbers; the command's own defaults (224 px) give others.
    """
    from conftest import small_config


    keras.utils.set_random_seed(7)
    checkpoint = tmp_path / "imagenet-like.weights.h5"
    models.build("resnet18", 1000, input_shape=(64, 64, 3)).save_weights(checkpoint)
    from tfdogs.weights import load as weights_load

    head_reads = []  # read as the model is built; the baseline has that ImageNet head at hand and reads no more
    monkeypatch.setattr(weights_load, "h5_num_classes",
                        lambda path, read=weights_load.h5_num_classes: head_reads.append(path) or read(path))
    # float32: on a CPU with native bfloat16 the run's frozen pass (and so its baseline) would be bfloat16's
    run_dir = training_loop.train(small_config(model="resnet18", weights=str(checkpoint), strategy="feature-extract",
                                       image_size=64, epochs=1, precision="float32", output=str(tmp_path / "run"),
                                       export_dir=str(tmp_path / "export")))
    summary = json.loads((run_dir / "metrics.json").read_text())
    recorded = summary["baselines"]["imagenet_zero_shot"]
    assert recorded["num_images"] == summary["num_val"] and recorded["weights"] == str(checkpoint)
    assert recorded["preprocessing"] == json.loads((run_dir / "preprocessing.json").read_text())
    assert recorded["preprocessing"]["image_size"] == 64
    assert head_reads == [checkpoint]

    (run_dir / "zeroshot.json").unlink()
    assert zeroshot.main(["--run", str(run_dir)]) == 0
    again = json.loads((run_dir / "zeroshot.json").read_text())
    # the run scored its frozen pass's features with the ImageNet classifier; the command runs the network
    assert {key: value for key, value in again.items() if key != "log_loss"} == {
        key: value for key, value in recorded.items() if key != "log_loss"}
    assert again["log_loss"] == pytest.approx(recorded["log_loss"], abs=1e-5)

    at_224 = tmp_path / "zeroshot-224.json"
    assert zeroshot.main(["--run", str(run_dir), "--image-size", "224", "--output", str(at_224)]) == 0
    other = json.loads(at_224.read_text())
    assert other["preprocessing"]["image_size"] == 224 and other["num_images"] == recorded["num_images"]
    assert other["log_loss"] != pytest.approx(recorded["log_loss"], rel=1e-3)
