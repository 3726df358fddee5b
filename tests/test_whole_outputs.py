"""Evaluations, reports and comparisons are written whole: an interruption leaves the earlier one as it was."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import matplotlib.figure
import numpy as np
import pytest
import tensorflow as tf

from tfdogs import ensemble as ensemble_command, evaluate as evaluate_command, export as export_command, files
from tfdogs.evaluation import plots, report
from tfdogs.runs import comparison, evaluation as run_evaluation


def snapshot(folder):
    """Every file under `folder` with its bytes, and the names beside it."""
    return ({path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()},
            sorted(path.name for path in folder.parent.iterdir()))


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt("SIGTERM")


def test_an_evaluation_cut_short_in_its_report_leaves_the_earlier_evaluation(lenet_run, tmp_path, monkeypatch):
    output = tmp_path / "evaluation"
    run_evaluation.evaluate(lenet_run, output=output)
    (output / "calibrated-by-hand.txt").write_text("an earlier evaluation's file")  # must not survive a new one
    before = snapshot(output)
    assert "report/index.html" in before[0] and "confusions.png" in before[0]

    monkeypatch.setattr(run_evaluation, "write_report",
                        lambda folder, **kwargs: (report.write_report(folder, **kwargs), interrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_evaluation.evaluate(lenet_run, output=output, calibrate=True)
    assert snapshot(output) == before  # neither the new evaluation.json nor a half report

    monkeypatch.undo()
    result = run_evaluation.evaluate(lenet_run, output=output, calibrate=True)
    after = snapshot(output)
    assert "calibrated-by-hand.txt" not in after[0] and "report/index.html" in after[0]
    assert json.loads(after[0]["evaluation.json"]) == {key: value for key, value in result.items() if key != "output"}
    assert after[1] == ["evaluation"]  # nothing left beside it


def test_evaluate_leaves_a_folder_it_did_not_write_and_says_so(lenet_run, tmp_path, capsys):
    output = tmp_path / "notes"
    output.mkdir()
    (output / "thesis.tex").write_text("mine")
    assert evaluate_command.main([str(lenet_run), "--output", str(output), "--verbose", "0"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {output} already holds files") and error.count("\n") == 1
    assert [path.name for path in output.iterdir()] == ["thesis.tex"]


def test_a_comparison_cut_short_leaves_the_earlier_report(lenet_run, tmp_path, monkeypatch):
    output = tmp_path / "reports" / "study"
    comparison.compare([lenet_run], output)
    before = snapshot(output)
    assert {"table.csv", "table.md", "index.html", "validation_curves.png"} <= set(before[0])

    monkeypatch.setattr(comparison, "write_index", interrupt)
    with pytest.raises(KeyboardInterrupt):
        comparison.compare([lenet_run], output, title="another title")
    assert snapshot(output) == before


def test_a_figure_cut_short_leaves_the_earlier_figure(tmp_path, monkeypatch):
    counts = [[3, 1], [2, 4]]
    path = tmp_path / "confusions.png"
    plots.plot_confusion_heat_map(np.array(counts), ["a", "b"], [0, 1], path)
    before = path.read_bytes()
    original = matplotlib.figure.Figure.savefig

    def half_then_interrupt(self, target, **kwargs):
        original(self, target, **kwargs)
        with open(target, "r+b") as written:
            written.truncate(100)
        interrupt()

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        plots.plot_confusion_heat_map(np.array(counts), ["a", "b"], [1, 0], path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["confusions.png"]
    assert files.remove_leftovers(tmp_path) == []


def sigterm_to_self(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises in this thread at once; never reached
    raise AssertionError("SIGTERM did not interrupt")


def test_sigterm_during_a_tflite_export_leaves_the_earlier_export_and_one_line(lenet_run, tmp_path, monkeypatch,
                                                                                capsys):
    output = tmp_path / "tflite"
    assert export_command.main([str(lenet_run), "--format", "tflite", "--output", str(output)]) == 0
    before = snapshot(output)
    assert set(before[0]) == {"model.tflite", "labels.txt", "tfdogs.json", "tflite.json"}
    capsys.readouterr()

    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_saved_model", sigterm_to_self)
    assert export_command.main([str(lenet_run), "--format", "tflite", "--output", str(output)]) == 143
    error = capsys.readouterr().err
    assert error == ("Stopped by SIGTERM: python -m tfdogs.export left its earlier outputs as they were and wrote "
                     "no partial one.\n")
    assert snapshot(output) == before  # no intermediate SavedModel beside it either


def test_ctrl_c_during_evaluate_gives_one_line_and_status_130(lenet_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_evaluation, "write_report", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGINT)
                        or time.sleep(5))
    output = tmp_path / "evaluation"
    # Python's own Ctrl-C handler, as in a terminal, whatever the test process inherited
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert evaluate_command.main([str(lenet_run), "--output", str(output), "--verbose", "0"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err.splitlines() == [
        "Stopped by Ctrl-C: python -m tfdogs.evaluate left its earlier outputs as they were and wrote no partial one."]
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_a_folder_it_may_not_write_in_gives_one_line(lenet_run, tmp_path, monkeypatch, capsys):
    """The OS's refusal, raised where the evaluation makes its folder (as root, chmod does not stop writes)."""
    real_mkdir = pathlib.Path.mkdir

    def read_only_mkdir(path, *args, **kwargs):
        if path.parent == lenet_run:
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only_mkdir)
    assert evaluate_command.main([str(lenet_run), "--verbose", "0"]) == 2
    assert capsys.readouterr().err == (f"error: cannot write in {lenet_run} (Permission denied); give an output "
                                       f"folder you can write to.\n")


def test_an_output_another_process_is_writing_is_refused_naming_it(lenet_run, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from tfdogs import lock\n"
        "with lock.hold(sys.argv[1], 'x'):\n    print('held', flush=True); time.sleep(60)\n"),
        str(tmp_path / ".evaluation.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert evaluate_command.main([str(lenet_run), "--output", str(tmp_path / "evaluation"), "--no-report",
                                      "--verbose", "0"]) == 2
        assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'evaluation'} is in use by pid {holder.pid} ")
        assert sorted(path.name for path in tmp_path.iterdir()) == [".evaluation.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_an_ensemble_over_an_earlier_one_replaces_it_whole_and_says_so(lenet_run, tmp_path, capsys):
    twin = tmp_path / "twin"
    shutil.copytree(lenet_run, twin)
    output = tmp_path / "ensemble"
    flags = [str(lenet_run), str(twin), "--output", str(output), "--export-dir", str(tmp_path / "export")]
    assert ensemble_command.main(flags) == 0
    assert "replaced whole" not in capsys.readouterr().out
    (output / "evaluation").mkdir()
    (output / "evaluation" / "evaluation.json").write_text("{}")  # the earlier ensemble's evaluation
    assert ensemble_command.main([*flags[:2], "--member-weights", "3", "1", *flags[2:]]) == 0
    assert f"Ensemble folder: {output} (the earlier ensemble there, and its evaluation, replaced whole)" in \
        capsys.readouterr().out
    assert sorted(path.name for path in output.iterdir()) == ["ensemble.json", "scores.csv", "scores.md"]
    assert [member["weight"] for member in json.loads((output / "ensemble.json").read_text())["members"]] == \
        pytest.approx([0.75, 0.25])
