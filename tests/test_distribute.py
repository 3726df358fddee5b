"""--distribute: strategy choice, replica scaling, and MirroredStrategy training like one device."""

import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

from tfdogs import config as config_lib
from tfdogs.training import devices

# Runs in a fresh process: logical devices must be set up before TensorFlow starts its runtime.
TWO_CPU_REPLICAS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    sys.path.insert(0, sys.argv[2])
    from conftest import small_config
    from tfdogs import models
    from tfdogs.training import devices, loop as training_loop, optimizer as training_optimizer, resume as training_resume

    base, out = sys.argv[1], {}

    # The training step itself, on fixed batches: two replicas of 8 against one device with 16.
    rng = np.random.default_rng(0)
    images = rng.standard_normal((64, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 4, 64).astype("int32")
    for name, per_replica in (("one", 16), ("two", 8)):
        strategy = devices.make_strategy("none" if name == "one" else "mirrored")
        batch, rate = devices.scale_for_replicas(per_replica, 4e-3 / (16 // per_replica),
                                                    strategy.num_replicas_in_sync)
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = models.build("lenet5", 4, input_shape=(32, 32, 3))
            model.compile(optimizer=training_optimizer.make_optimizer("adam", training_optimizer.WarmupCosine(rate, 12),
                                                                      0.9, {}),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)
        history = model.fit(dataset, epochs=3, verbose=0, shuffle=False).history
        out["step_" + name] = {"loss": history["loss"], "batch": batch, "rate": rate,
                               "replicas": strategy.num_replicas_in_sync,
                               "weights": [w.ravel().tolist() for w in model.get_weights()]}

    # End to end: python -m tfdogs.train --distribute mirrored against --distribute none.
    common = dict(epochs=3, dropout=0.0, synthetic_images_per_class=24)
    runs = {"one": small_config(distribute="none", batch_size=16, learning_rate=4e-3, **common),
            # Adam: the rate grows with the square root of the replicas (README "Training on several devices")
            "two": small_config(distribute="mirrored", batch_size=8, learning_rate=4e-3 / 2 ** 0.5, **common)}
    for name, config in runs.items():
        run_dir = training_loop.train({**config, "output": f"{base}/{name}", "export_dir": f"{base}/{name}-export"})
        metrics = json.loads((run_dir / "metrics.json").read_text())
        history = training_resume.read_history(run_dir / "history.csv")
        out["run_" + name] = {key: metrics[key] for key in
                              ("distribute", "replicas", "global_batch_size", "learning_rate")}
        out["run_" + name].update(loss=history["loss"].tolist(), val_accuracy=metrics["val"]["accuracy"])
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def two_replica_runs(tmp_path_factory):
    """Training with one device and with MirroredStrategy over two logical CPU devices."""
    tests_dir = str(pathlib.Path(__file__).parent)
    base = tmp_path_factory.mktemp("distribute")
    done = subprocess.run([sys.executable, "-c", TWO_CPU_REPLICAS_SCRIPT, str(base), tests_dir],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_mirrored_step_on_two_cpu_devices_equals_one_device_with_the_global_batch(two_replica_runs):
    one, two = two_replica_runs["step_one"], two_replica_runs["step_two"]
    assert (one["replicas"], two["replicas"]) == (1, 2)
    assert one["batch"] == two["batch"] == 16 and two["rate"] == pytest.approx(one["rate"])
    # Each replica's half-batch gradient, all-reduced, is the whole batch's: the same trajectory up to
    # float32 summation order. Measured: the logged losses equal, the weights after 12 steps at most 6.4e-7 apart.
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert one["loss"][-1] < one["loss"][0]
    for mirrored, single in zip(two["weights"], one["weights"]):
        assert mirrored == pytest.approx(single, rel=0, abs=2e-6)


def test_training_with_mirrored_converges_like_one_device(two_replica_runs):
    one, two = two_replica_runs["run_one"], two_replica_runs["run_two"]
    assert (one["distribute"], one["replicas"]) == ("none", 1)
    assert (two["distribute"], two["replicas"]) == ("mirrored", 2)
    assert two["global_batch_size"] == one["global_batch_size"] == 16
    assert two["learning_rate"] == pytest.approx(one["learning_rate"]) == pytest.approx(4e-3)
    # Step for step: the pipeline's batches are keyed by (seed, epoch), so both runs see the same global batches,
    # and each epoch's loss agrees to float32 summation order (measured at most 2.2e-7 relative, over 3 epochs).
    for run in (one, two):
        assert run["loss"][-1] < 0.5 * run["loss"][0]
        assert run["val_accuracy"] >= 0.6
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["val_accuracy"] == one["val_accuracy"]


@pytest.mark.parametrize("optimizer, replicas, expected", [
    ("sgd", 1, (32, 1e-3)), ("sgd", 2, (64, 2e-3)), ("sgd", 8, (256, 8e-3)),  # linear
    ("adam", 1, (32, 1e-3)), ("adam", 4, (128, 2e-3)), ("adamw", 16, (512, 4e-3)),  # square root
])
def test_global_batch_and_learning_rate_scale_with_replicas(optimizer, replicas, expected):
    batch, rate = devices.scale_for_replicas(32, 1e-3, replicas, optimizer)
    assert batch == expected[0] and rate == pytest.approx(expected[1])


def test_zero_replicas_is_refused():
    with pytest.raises(ValueError, match="replicas"):
        devices.scale_for_replicas(32, 1e-3, 0)


def test_auto_picks_multi_worker_from_a_tf_config_cluster(monkeypatch):
    cluster = {"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    assert devices.workers_in_tf_config() == 2
    assert devices.resolve_name("auto") == "multi-worker"
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["host1:2222"]}}))
    assert devices.resolve_name("auto") == "none"  # one worker and no GPU here
    monkeypatch.delenv("TF_CONFIG")
    assert devices.resolve_name("auto") == "none"
    assert devices.resolve_name("mirrored") == "mirrored"


def test_bad_tf_config_and_unknown_names_are_explained(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "not json")
    with pytest.raises(ValueError, match="TF_CONFIG"):
        devices.workers_in_tf_config()
    with pytest.raises(ValueError, match="mirrored"):
        devices.resolve_name("ring")


def test_distribute_is_a_checked_config_key_and_flag():
    assert config_lib.DEFAULTS["distribute"] == "auto"
    values = {**config_lib.DEFAULTS, "model": "lenet5", "distribute": "mirrored"}
    assert config_lib.validate(values)["distribute"] == "mirrored"
    with pytest.raises(config_lib.ConfigError, match="distribute"):
        config_lib.validate({**values, "distribute": "horovod"})
