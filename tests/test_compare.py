import json
import math
import shutil

import pandas as pd
import pytest
from test_evaluate import assert_png

from tfdogs import compare, config as config_lib
from tfdogs.runs import comparison, folder as run_folder


def doctored_copy(run_dir, destination, *, accuracy_shift=-0.1, seconds=4000.0, zeroshot=None, move_val_row=False):
    """A second 'run' made from a finished one with other numbers: compare reads files only."""
    destination.mkdir(parents=True)
    for name in ("config.yaml", "split.csv", "history.csv"):
        shutil.copy(run_dir / name, destination / name)
    summary = json.loads((run_dir / "metrics.json").read_text())
    summary["val"]["accuracy"] += accuracy_shift
    summary["val"]["log_loss"] *= 2
    summary["peak_val_accuracy"] += accuracy_shift
    summary["final_val_accuracy"] += 2 * accuracy_shift
    summary["best_epoch"], summary["train_seconds"] = 2, seconds
    summary["parameters"]["total"] = 11_689_512
    history = pd.read_csv(destination / "history.csv")
    history["val_accuracy"] += accuracy_shift
    history.to_csv(destination / "history.csv", index=False)
    if move_val_row:  # a different split: one validation image becomes a training image
        split = pd.read_csv(destination / "split.csv")
        split.loc[split.index[split["subset"] == "val"][0], "subset"] = "train"
        split.to_csv(destination / "split.csv", index=False)
        summary["baselines"]["most_frequent"]["accuracy"] = 0.3
    (destination / "metrics.json").write_text(json.dumps(summary))
    if zeroshot:
        (destination / "zeroshot.json").write_text(json.dumps(zeroshot))
    return destination


ZERO_SHOT = {"model": "resnet18", "weights": "imagenet", "num_images": 16, "num_classes": 4,
             "accuracy": 0.625, "top5_accuracy": 1.0, "log_loss": 0.9}


def test_table_holds_each_runs_metrics_and_the_baselines_once(lenet_run, tmp_path):
    other = doctored_copy(lenet_run, tmp_path / "resnet18-demo", zeroshot=ZERO_SHOT)
    extra = tmp_path / "zeroshot-resnet34.json"
    extra.write_text(json.dumps({**ZERO_SHOT, "model": "resnet34", "accuracy": 0.75}))
    output = tmp_path / "reports" / "study"
    comparison.compare([lenet_run, other], output, zeroshot_files=[extra])

    table = pd.read_csv(output / "table.csv")
    runs = table[table["kind"] == "run"].set_index("name")
    for run_dir in (lenet_run, other):
        summary = json.loads((run_dir / "metrics.json").read_text())
        row = runs.loc[run_dir.name]
        assert row["val_accuracy"] == summary["val"]["accuracy"]
        assert row["val_top5_accuracy"] == summary["val"]["top5_accuracy"]
        assert row["val_log_loss"] == summary["val"]["log_loss"]
        assert row["peak_val_accuracy"] == summary["peak_val_accuracy"]
        assert row["final_val_accuracy"] == summary["final_val_accuracy"]
        assert row["peak_epoch"] == summary["best_epoch"] and row["epochs_run"] == summary["epochs_run"]
        assert row["train_seconds"] == summary["train_seconds"]
        assert row["parameters"] == summary["parameters"]["total"]
        assert row["model"] == "lenet5" and row["strategy"] == "scratch"

    baselines = table[table["kind"] == "baseline"].set_index("name")
    shared = json.loads((lenet_run / "metrics.json").read_text())["baselines"]
    assert baselines.loc["random guess", "val_accuracy"] == pytest.approx(0.25)
    assert baselines.loc["random guess", "val_log_loss"] == pytest.approx(math.log(4))
    assert baselines.loc["class prior (training frequencies)", "val_log_loss"] == shared["class_prior"]["log_loss"]
    breed = shared["most_frequent"]["breed"]
    assert baselines.loc[f"most frequent breed ({breed})", "val_accuracy"] == shared["most_frequent"]["accuracy"]
    assert baselines.loc["ImageNet zero-shot resnet18 (imagenet)", "val_accuracy"] == 0.625
    assert baselines.loc["ImageNet zero-shot resnet34 (imagenet)", "val_accuracy"] == 0.75
    assert len(baselines) == 5  # the two runs share a split: each baseline once

    markdown = (output / "table.md").read_text()
    summary = json.loads((lenet_run / "metrics.json").read_text())
    assert f"| {lenet_run.name} | lenet5 (scratch, none) | {100 * summary['val']['accuracy']:.2f} % |" in markdown
    assert "| 1 h 06 min |" in markdown and "| 11,689,512 |" in markdown  # 4000 s, the doctored run

    assert_png(output / "validation_curves.png")
    for run_dir in (lenet_run, other):
        assert_png(output / "curves" / f"{run_dir.name}.png")
    page = (output / "index.html").read_text()
    for image in ["validation_curves.png", f"curves/{lenet_run.name}.png", f"curves/{other.name}.png"]:
        assert f'src="{image}"' in page
    assert f"{100 * summary['val']['accuracy']:.2f} %" in page and "ImageNet zero-shot resnet34" in page
    assert "different splits" not in page


def test_runs_on_different_splits_get_their_own_baselines_and_a_warning(lenet_run, tmp_path):
    other = doctored_copy(lenet_run, tmp_path / "other", move_val_row=True)
    table = comparison.compare([lenet_run, other], tmp_path / "report")
    names = set(table.loc[table["kind"] == "baseline", "name"])
    breed = json.loads((lenet_run / "metrics.json").read_text())["baselines"]["most_frequent"]["breed"]
    assert {f"most frequent breed ({breed}) — {lenet_run.name}", f"most frequent breed ({breed}) — other"} <= names
    assert "random guess" in names  # equal values stay one row
    assert "different splits" in (tmp_path / "report" / "index.html").read_text()


def test_same_named_runs_are_told_apart_by_their_parent(lenet_run, tmp_path):
    first = doctored_copy(lenet_run, tmp_path / "a" / "run")
    second = doctored_copy(lenet_run, tmp_path / "b" / "run", accuracy_shift=-0.2)
    table = comparison.compare([first, second], tmp_path / "report")
    assert list(table.loc[table["kind"] == "run", "name"]) == ["a/run", "b/run"]
    assert_png(tmp_path / "report" / "curves" / "a__run.png")


def test_overrides_are_read_as_yaml_and_output_is_refused():
    assert comparison.parse_overrides(["epochs=3", "data=synthetic", "flip=false", "learning-rate=0.01",
                                    "cache=null"]) == {
        "epochs": 3, "data": "synthetic", "flip": False, "learning_rate": 0.01, "cache": None}
    with pytest.raises(config_lib.ConfigError, match="--set output"):
        comparison.parse_overrides(["output=runs/x"])
    with pytest.raises(config_lib.ConfigError, match="KEY=VALUE"):
        comparison.parse_overrides(["epochs"])


def test_bad_folders_and_files_are_named(lenet_run, tmp_path, capsys):
    broken = doctored_copy(lenet_run, tmp_path / "broken")
    summary = json.loads((broken / "metrics.json").read_text())
    del summary["peak_val_accuracy"]
    (broken / "metrics.json").write_text(json.dumps(summary))
    with pytest.raises(run_folder.RunFolderError, match=r"broken/metrics.json lacks the key 'peak_val_accuracy'"):
        comparison.compare([broken], tmp_path / "report")

    bad_zeroshot = tmp_path / "zs.json"
    bad_zeroshot.write_text(json.dumps({"accuracy": 0.5}))
    assert compare.main([str(lenet_run), "--zeroshot", str(bad_zeroshot), "--output", str(tmp_path / "r")]) == 2
    assert "zs.json lacks top5_accuracy, log_loss" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "missing"), "--output", str(tmp_path / "r")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert compare.main(["--output", str(tmp_path / "r")]) == 2
    assert "Nothing to compare" in capsys.readouterr().err
    assert compare.main(["--configs", str(tmp_path / "nope.yaml"), "--output", str(tmp_path / "r")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
