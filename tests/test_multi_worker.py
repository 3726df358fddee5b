"""--distribute multi-worker: two `python -m tfdogs.train` processes on loopback ports, as on two machines.

Every worker is a subprocess with a timeout (killed with SIGKILL: a worker
waiting for its cluster does not stop on SIGTERM), so a hang fails fast.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from tfdogs.training import cluster

TIMEOUT = 300  # seconds for any one worker process

LENET = ["--model", "lenet5", "--data", "synthetic", "--synthetic-classes", "4",
         "--synthetic-images-per-class", "20", "--image-size", "32", "--batch-size", "8", "--epochs", "5",
         "--early-stopping-patience", "0", "--verbose", "0"]
RESNET = ["--model", "resnet18", "--weights", "none", "--strategy", "scratch", "--precision", "float32",
          "--data", "synthetic", "--synthetic-classes", "4", "--synthetic-images-per-class", "12",
          "--image-size", "32", "--batch-size", "8", "--epochs", "2", "--early-stopping-patience", "0",
          "--verbose", "0"]

# One process, MirroredStrategy over two logical CPU devices: the single-machine run with the same global batch.
TWO_DEVICES = textwrap.dedent("""
    import sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tfdogs import train
    sys.exit(train.main(sys.argv[1:]))
""")

HISTORY_COLUMNS = ["loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"]


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def worker_env(ports, index, base, **extra):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    scratch = base / "tmp"
    scratch.mkdir(exist_ok=True)
    return {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            "TMPDIR": str(scratch), "TF_CPP_MIN_LOG_LEVEL": "2", "TFDOGS_PEER_TIMEOUT": "120", **extra}


def start(args, env, log):
    return subprocess.Popen(args, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def finish(processes, timeout=TIMEOUT):
    """Exit codes of the processes; any still running after `timeout` is killed and the test fails."""
    deadline = time.time() + timeout
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(max(deadline - time.time(), 1)))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail(f"a worker ran past {timeout} s: {process.args}")
    return codes


def train_command(flags, base, name):
    return [sys.executable, "-m", "tfdogs.train", *flags, "--output", str(base / name),
            "--export-dir", str(base / f"{name}-export")]


def two_workers(flags, base, name="run", **env):
    ports = free_ports(2)
    processes = [start(train_command(flags, base, name), worker_env(ports, index, base, **env),
                       base / f"{name}-worker{index}.log") for index in range(2)]
    return processes, ports


@pytest.fixture(scope="module")
def lenet_runs(tmp_path_factory):
    """LeNet-5 trained by two worker processes, and by one process on two devices, side by side."""
    base = tmp_path_factory.mktemp("multi_worker")
    workers, _ = two_workers(LENET, base)
    reference = start([sys.executable, "-c", TWO_DEVICES, *train_command(LENET, base, "reference")[3:],
                       "--distribute", "mirrored"], {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                      base / "reference.log")
    codes = finish([*workers, reference])
    return base, codes


def log(base, name):
    return (base / name).read_text()


def assert_same_history(run, reference, rtol):
    ours, theirs = (pd.read_csv(folder / "history.csv") for folder in (run, reference))
    assert list(ours["epoch"]) == list(theirs["epoch"])
    for column in HISTORY_COLUMNS:
        assert ours[column].tolist() == pytest.approx(theirs[column].tolist(), rel=rtol, abs=1e-6), column


def assert_one_export(base):
    exports = [path.parent for path in base.rglob("saved_model.pb") if "reference-export" not in path.parts]
    assert exports == [base / "run-export" / "1"], exports  # the two workers' run exported once, by the chief


def test_two_workers_train_lenet5_like_one_process_on_two_devices(lenet_runs):
    base, codes = lenet_runs
    assert codes == [0, 0, 0], log(base, "run-worker0.log")[-3000:] + log(base, "run-worker1.log")[-3000:]
    metrics = json.loads((base / "run" / "metrics.json").read_text())
    reference = json.loads((base / "reference" / "metrics.json").read_text())
    assert (metrics["distribute"], metrics["replicas"], metrics["global_batch_size"]) == ("multi-worker", 2, 16)
    assert (reference["distribute"], reference["replicas"]) == ("mirrored", 2)
    assert metrics["learning_rate"] == pytest.approx(reference["learning_rate"])
    # The same images, crops, flips and augmentation in every global batch; only the all-reduce's float32
    # summation order differs. Measured: equal to the last digit on this machine.
    assert_same_history(base / "run", base / "reference", rtol=1e-4)
    assert "This worker's part is done" in log(base, "run-worker1.log")


def test_only_the_chief_writes_and_the_other_worker_leaves_nothing(lenet_runs):
    base, codes = lenet_runs
    assert_one_export(base)
    run = base / "run"
    for name in ("config.yaml", "split.csv", "problems.csv", "history.csv", "metrics.json", "model.keras",
                 "curves.png", "best.weights.h5"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".partial-*"))
    assert list((base / "tmp").iterdir()) == []  # worker 1's temporary run folder is gone
    for name in ("run-worker0.log", "run-worker1.log"):
        assert "Traceback" not in log(base, name)


@pytest.mark.slow
def test_a_worker_killed_with_sigkill_rejoins_and_the_history_equals_an_uninterrupted_run(lenet_runs):
    base, codes = lenet_runs
    assert codes[:2] == [0, 0]
    workers, ports = two_workers(LENET, base, name="killed")
    backup = base / "killed" / "backup" / "all" / "training_metadata.json"
    deadline = time.time() + TIMEOUT
    while not (backup.is_file() and json.loads(backup.read_text())["epoch"] >= 2):
        assert time.time() < deadline and workers[0].poll() is None, log(base, "killed-worker0.log")[-3000:]
        time.sleep(0.1)
    os.kill(workers[1].pid, signal.SIGKILL)
    workers[1].wait()
    restarted = start(train_command(LENET, base, "killed"), worker_env(ports, 1, base),
                      base / "killed-worker1-again.log")
    assert finish([workers[0], restarted]) == [0, 0], log(base, "killed-worker0.log")[-3000:]
    chief = log(base, "killed-worker0.log")
    assert "lost a peer" in chief and "Resuming the run" in chief and "Traceback" not in chief
    assert_same_history(base / "killed", base / "run", rtol=1e-6)


@pytest.mark.slow
def test_two_workers_train_resnet18_like_one_process_on_two_devices(tmp_path):
    workers, _ = two_workers(RESNET, tmp_path)
    reference = start([sys.executable, "-c", TWO_DEVICES, *train_command(RESNET, tmp_path, "reference")[3:],
                       "--distribute", "mirrored"], {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                      tmp_path / "reference.log")
    assert finish([*workers, reference]) == [0, 0, 0], log(tmp_path, "run-worker0.log")[-3000:]
    # BatchNorm statistics and 11M float32 weights: summation order shows a little more than in LeNet-5.
    assert_same_history(tmp_path / "run", tmp_path / "reference", rtol=1e-3)
    assert_one_export(tmp_path)


def test_workers_started_with_different_flags_stop_and_name_the_keys(tmp_path):
    ports = free_ports(2)
    flags = [LENET, [*LENET, "--learning-rate", "0.002", "--seed", "3"]]
    processes = [start(train_command(flags[index], tmp_path, "run"), worker_env(ports, index, tmp_path),
                       tmp_path / f"worker{index}.log") for index in range(2)]
    assert finish(processes, timeout=120) == [2, 2]
    for index in range(2):
        output = log(tmp_path, f"worker{index}.log")
        assert "learning_rate: 0.001 here, 0.002 there" in output or "learning_rate: 0.002 here, 0.001 there" in output
        assert "seed" in output and "Traceback" not in output
    assert not (tmp_path / "run").exists()  # the chief removes the run folder it had created


def test_a_worker_whose_peers_never_come_names_their_address(tmp_path):
    ports = free_ports(2)
    alone = [start(train_command(LENET, tmp_path, "run"), worker_env(ports, index, tmp_path, TFDOGS_PEER_TIMEOUT="8"),
                   tmp_path / f"worker{index}.log") for index in range(2)]
    alone[1].kill()  # never joins
    alone[1].wait()
    # TensorFlow holds Python's lock while it waits, so a watchdog process ends the worker with SIGKILL.
    assert finish(alone[:1], timeout=120) == [-signal.SIGKILL]
    output = log(tmp_path, "worker0.log")
    assert f"could not reach its peers within 8 s: nothing answers at 127.0.0.1:{ports[1]}" in output
    assert "Traceback" not in output and not (tmp_path / "run").exists()


def test_a_task_missing_from_the_cluster_is_refused_before_any_work(tmp_path):
    env = worker_env(free_ports(2), 2, tmp_path)
    done = subprocess.run(train_command(LENET, tmp_path, "run"), env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "task {'type': 'worker', 'index': 2} is not in its cluster" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("tf_config, message", [
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 5}}, "is not in its cluster"),
    ({"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}, "is not in its cluster"),
    ({"cluster": {"worker": ["a:1"], "ps": ["c:3"]}, "task": {"type": "worker", "index": 0}}, "'ps'"),
    ({"cluster": {"worker": ["a:1", "b:2"]}}, "names no task"),
])
def test_tf_config_tasks_are_checked_against_the_cluster(monkeypatch, tf_config, message):
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    with pytest.raises(cluster.ClusterError, match=message):
        cluster.read_task()


def test_the_chief_is_worker_zero_unless_the_cluster_has_a_chief(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                "task": {"type": "worker", "index": 1}}))
    task = cluster.read_task()
    assert not task.is_chief and task.address == "b:2" and task.peers() == ["a:1"]
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["c:0"], "worker": ["a:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert not cluster.read_task().is_chief
    monkeypatch.setenv(cluster.PEER_TIMEOUT_VARIABLE, "soon")
    with pytest.raises(cluster.ClusterError, match=cluster.PEER_TIMEOUT_VARIABLE):
        cluster.peer_timeout()
