"""`python -m tfdogs.bench --models keras_hub:DIR`: a keras-hub preset measured like the hand-built models.

The preset is a tiny random keras-hub ResNet written by `save_to_preset` into a
temporary folder (as in tests/test_hub.py); nothing is downloaded.
"""

import argparse
import json

import keras
import pytest
from test_bench import check_tfdogs_rows, clocked, memory_mb  # noqa: F401 (clocked: a fixture)

from tfdogs import bench, models
from tfdogs.bench import steps

SIZE = 32
TINY = ["--parts", "train", "inference", "--image-size", str(SIZE), "--batch-size", "4", "--windows", "1",
        "--window-steps", "1", "--warmup-steps", "1", "--in-process", "--no-torch"]


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """A tiny random keras-hub ResNet saved as a Backbone preset."""
    import keras_hub

    keras.utils.set_random_seed(3)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 8, 8, 8],
        stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(None, None, 3))
    folder = tmp_path_factory.mktemp("bench_preset") / "tiny_resnet"
    backbone.save_to_preset(str(folder))
    return folder


def test_a_keras_hub_preset_is_measured_for_training_and_inference(preset, tmp_path, clocked):
    name = f"keras_hub:{preset}"
    rss_before_mb = memory_mb("VmRSS")
    rows = bench.main(["--models", name, *TINY, "--output", str(tmp_path / "benchmark")])
    assert {(row["part"], row["setting"]) for row in rows} >= {("train", "float32"), ("inference", "float32")}
    assert all(row["model"] == name and row["framework"] == "tfdogs" for row in rows)
    # each rate is its batch over the seconds measured; peak memory above the weights and what was held before
    check_tfdogs_rows(rows, clocked, rss_before_mb)
    # PyTorch has no counterpart: no ratios, no targets
    assert all(row["ratio_vs_torch"] is None and row["target"] is None for row in rows)
    # the parameters measured: the training rows' model is the one tfdogs.train builds
    built = models.build(name, 120, input_shape=(SIZE, SIZE, 3)).count_params()
    assert {row["parameters"] for row in rows if row["part"] == "train"} == {built}
    inference = [row["parameters"] for row in rows if row["part"] == "inference"]
    assert inference and all(0 < count < built for count in inference)  # BatchNorms folded away
    written = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
    assert [row["parameters"] for row in written] == [row["parameters"] for row in rows]
    assert "parameters" in (tmp_path / "benchmark.csv").read_text().splitlines()[0].split(",")


def test_keras_hub_models_get_no_pytorch_jobs_and_local_presets_are_built_by_absolute_path(preset, monkeypatch):
    monkeypatch.chdir(preset.parent)
    args = bench.parse_args(["--models", "lenet5", f"keras_hub:{preset.name}", "--parts", "train"])
    jobs = bench.plan(args, lambda part: [steps.Setting("float32")], "/tmp", [], "files.txt")
    frameworks = {(job["model"], framework) for framework, job in jobs}
    assert frameworks == {("lenet5", "torch"), ("lenet5", "tfdogs"), (f"keras_hub:{preset.name}", "tfdogs")}
    hub_job = next(job for _, job in jobs if job["model"] != "lenet5")
    assert hub_job["build"] == f"keras_hub:{preset}"  # a measurement in another directory still finds it


def test_unknown_models_are_refused_by_name():
    with pytest.raises(argparse.ArgumentTypeError, match="resnet99"):
        bench.model_name("resnet99")
    assert bench.model_name("keras_hub:efficientnet_b0_ra_imagenet") == "keras_hub:efficientnet_b0_ra_imagenet"
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "resnet99"])


def test_the_table_names_keras_hub_rows_as_tfdogs_alone():
    row = {"part": "train", "model": "keras_hub:/x/presets/efficientnet_b0", "framework": "tfdogs",
           "setting": "float32", "images_per_second": 12.0, "spread_percent": 1.0, "peak_rss_mb": 900.0,
           "parameters": 4_203_284, "ratio_vs_torch": None, "ratio_vs_torch_tuned": None, "target": None,
           "target_met": None}
    table = bench.format_table([row], "PyTorch absent (--no-torch)")
    assert "keras_hub-efficientnet_b0" in table and "4.20" in table
    assert "no ratios" in table.splitlines()[1]
