"""Training on several devices or machines with TensorFlow's own `tf.distribute`.

`--distribute` picks the strategy:

    none          one device (TensorFlow's default strategy).
    mirrored      `tf.distribute.MirroredStrategy`: one replica per local GPU
                  (without GPUs, per logical CPU device when several are set up).
    multi-worker  `tf.distribute.MultiWorkerMirroredStrategy` across machines
                  described by the `TF_CONFIG` environment variable (TensorFlow's
                  distributed runtime; without TF_CONFIG it runs as one worker).
    auto          multi-worker when TF_CONFIG names several workers, mirrored
                  with more than one local GPU, otherwise none.

`--batch-size` is per replica: the global batch is `batch_size * replicas`,
and the learning rate grows by the same factor (the linear scaling rule of
Goyal et al. 2017, https://arxiv.org/abs/1706.02677), so one step sees
`replicas` times as many images at a proportionally larger rate.

Multi-worker example: the same command on each machine, each with its own
task index in TF_CONFIG:

    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                "task": {"type": "worker", "index": 0}}' \\
        python -m tfdogs.train --distribute multi-worker --model resnet18 --data-dir DATA --output runs/r18

The chief (task "chief", else worker 0) writes the run folder and the export;
the other workers keep what the strategy needs in temporary folders, receive
the chief's settings, split and resume state through TensorFlow's
coordination service (`Cluster`), and take the chief's weights when a run
resumes (`broadcast_from_chief`). A worker that cannot reach its peers within
TFDOGS_PEER_TIMEOUT seconds (default 300) stops and names them.
"""

import dataclasses
import json
import os
import subprocess
import sys

import tensorflow as tf
from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
from tensorflow.python.eager import context

STRATEGIES = ("auto", "none", "mirrored", "multi-worker")


def cpu_has_native_bfloat16():
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX), as oneDNN then uses it."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def workers_in_tf_config():
    """Number of worker (and chief) tasks named by the TF_CONFIG environment variable; 0 without it."""
    text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        return 0
    try:
        cluster = json.loads(text).get("cluster", {})
    except (ValueError, AttributeError):
        raise ValueError(f"TF_CONFIG is not a JSON object with a 'cluster' mapping: {text[:200]!r}") from None
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def resolve_name(name):
    """Turns `auto` into the strategy that fits this machine, without starting TensorFlow's runtime."""
    if name not in STRATEGIES:
        raise ValueError(f"Unknown distribution strategy {name!r}; choose one of {', '.join(STRATEGIES)}.")
    if name != "auto":
        return name
    if workers_in_tf_config() > 1:
        return "multi-worker"
    return "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "none"


def make_strategy(name, cleanup=()):
    """The `tf.distribute.Strategy` for a `--distribute` value.

    Call it before other TensorFlow work: MultiWorkerMirroredStrategy must
    configure collective ops before the runtime starts.

    Args:
        name: one of `STRATEGIES`.
        cleanup: folders to remove if the process must stop waiting for its peers.

    Returns:
        A strategy; `strategy.scope()` is where the model is built and compiled.

    Raises:
        ClusterError: TF_CONFIG's task is not in its cluster, or its port is taken.
        PeerLost: the cluster went away while this worker joined it.
    """
    name = resolve_name(name)
    if name == "multi-worker":
        task = read_task()
        if task is None:  # no TF_CONFIG: one worker on its own
            return tf.distribute.MultiWorkerMirroredStrategy()
        return _multi_worker_strategy(task, peer_timeout(), cleanup)
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    return tf.distribute.get_strategy()


def scale_for_replicas(batch_size, learning_rate, replicas, optimizer="sgd"):
    """Global batch and learning rate for `replicas` replicas.

    The global batch grows with the replicas. The rate follows the rule that
    fits the optimizer: linear for SGD (Goyal et al. 2017, "Accurate, Large
    Minibatch SGD": k times the batch, k times the rate), square root for
    Adam and AdamW, whose per-coordinate normalisation already absorbs part
    of the larger batch's smaller gradient noise (Malladi et al. 2022, "On the
    SDEs and Scaling Rules for Adaptive Gradient Algorithms").

    Args:
        batch_size: images per replica and step.
        learning_rate: the rate for one replica's batch.
        replicas: `strategy.num_replicas_in_sync`.
        optimizer: "sgd", "adam" or "adamw".

    Returns:
        (global batch size, scaled learning rate).
    """
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1; got {replicas}")
    factor = replicas if optimizer == "sgd" else replicas ** 0.5
    return batch_size * replicas, learning_rate * factor


def replica_facts(strategy, batch_size, learning_rate, optimizer="sgd"):
    """What a run records about its devices: strategy, replicas, global batch and scaled rate."""
    replicas = strategy.num_replicas_in_sync
    global_batch_size, scaled_rate = scale_for_replicas(batch_size, learning_rate, replicas, optimizer)
    name = ("multi-worker" if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else
            "mirrored" if isinstance(strategy, tf.distribute.MirroredStrategy) else "none")
    return {"distribute": name, "replicas": replicas,
            "global_batch_size": global_batch_size, "learning_rate": scaled_rate}


def shard_by_data(dataset):
    """Lets each worker keep its share of the pipeline's elements.

    tf.data's default policy first tries to shard by input files, which fails
    for a pipeline that reads files named in a tensor and warns; sharding the
    elements is what it then falls back to anyway.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


# Multi-worker runs: who this process is in TF_CONFIG's cluster, and what the workers share.

PEER_TIMEOUT_VARIABLE = "TFDOGS_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 300.0


class ClusterError(RuntimeError):
    """A multi-worker run that cannot start or go on; the message names the task, address or setting."""


class PeerLost(ClusterError):
    """A peer stopped answering during training; running the same command again rejoins the cluster."""


@dataclasses.dataclass(frozen=True)
class Task:
    """This process's place in TF_CONFIG's cluster."""

    cluster: dict  # job name -> list of "host:port"
    task_type: str
    index: int

    @property
    def address(self):
        return self.cluster[self.task_type][self.index]

    @property
    def is_chief(self):
        """The chief writes the run: task "chief" if the cluster has one, else worker 0 (TensorFlow's rule)."""
        return self.task_type == "chief" if "chief" in self.cluster else self.index == 0

    @property
    def name(self):
        return f"{self.task_type} {self.index} ({self.address})"

    def tasks(self):
        """Every (job, index) of the cluster, the chief first, as TensorFlow numbers them."""
        return [(job, index) for job in ("chief", "worker") for index in range(len(self.cluster.get(job, [])))]

    def peers(self):
        return [self.cluster[job][index] for job, index in self.tasks() if (job, index) != (self.task_type, self.index)]


def read_task():
    """The task TF_CONFIG gives this process, checked against its cluster; None without TF_CONFIG.

    Raises:
        ClusterError: TF_CONFIG is not JSON, names no task, a job other than
            chief and worker, or a task the cluster does not list.
    """
    text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        return None
    try:
        tf_config = json.loads(text)
        cluster, task = tf_config["cluster"], tf_config.get("task")
        cluster = {job: list(addresses) for job, addresses in cluster.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ClusterError(f"TF_CONFIG is not a JSON object with a 'cluster' mapping: {text[:200]!r}") from None
    others = sorted(set(cluster) - {"chief", "worker"})
    if others:
        raise ClusterError(f"TF_CONFIG's cluster has jobs {others}; tfdogs trains with 'chief' and 'worker' only.")
    if not isinstance(task, dict) or "type" not in task:
        raise ClusterError(f"TF_CONFIG names no task ({{\"type\": \"worker\", \"index\": N}}): {text[:200]!r}")
    task_type, index = task["type"], task.get("index", 0)
    listed = cluster.get(task_type, [])
    if not isinstance(index, int) or not 0 <= index < len(listed):
        jobs = ", ".join(f"{job}: {addresses}" for job, addresses in cluster.items())
        raise ClusterError(f"TF_CONFIG's task {task} is not in its cluster ({jobs}); give each process "
                           f"the type and index of its own address.")
    return Task(cluster, task_type, index)


def peer_timeout():
    """Seconds a worker waits for its peers: TFDOGS_PEER_TIMEOUT, default 300."""
    value = os.environ.get(PEER_TIMEOUT_VARIABLE, "")
    try:
        seconds = float(value) if value.strip() else DEFAULT_PEER_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ClusterError(f"{PEER_TIMEOUT_VARIABLE} must be a positive number of seconds; got {value!r}")
    return seconds


# Runs in a small process of its own (see `_PeerWatchdog`): argv = parent pid, seconds, JSON of the rest.
_WATCHDOG_SCRIPT = """
import json, os, select, shutil, signal, socket, sys
parent, seconds, facts = int(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
if select.select([sys.stdin], [], [], seconds)[0]:
    sys.exit(0)  # the parent joined its cluster (or ended) and closed the pipe
missing = []
for address in facts["peers"]:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
    except (OSError, ValueError):
        missing.append(address)
where = ("nothing answers at " + ", ".join(missing) if missing else
         ", ".join(facts["peers"]) + " answered but did not join")
os.kill(parent, signal.SIGKILL)
for path in facts["cleanup"]:
    shutil.rmtree(path, ignore_errors=True)
print(f"error: {facts['name']} could not reach its peers within {seconds:g} s: {where}. " + facts["advice"],
      file=sys.stderr, flush=True)
"""


class _PeerWatchdog:
    """Ends the process with a message naming the peers if the block inside takes longer than `seconds`.

    While TensorFlow waits for the cluster it blocks in C++ holding Python's
    lock (the chief waits without limit and stops on neither SIGTERM nor
    Ctrl-C), so no Python thread or exception can act: a small process
    watches instead, names the peers that do not answer, removes `cleanup`
    and kills this one (exit status 137).
    """

    def __init__(self, task, seconds, cleanup=()):
        self.facts = {"name": task.name, "peers": task.peers(), "cleanup": [str(path) for path in cleanup],
                      "advice": "Start the same command on every machine of TF_CONFIG's cluster (each with its "
                                "own task index), check the addresses and that their ports are open, or raise "
                                f"{PEER_TIMEOUT_VARIABLE}."}
        self.seconds = seconds

    def __enter__(self):
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG_SCRIPT, str(os.getpid()), str(self.seconds), json.dumps(self.facts)],
            stdin=subprocess.PIPE)
        return self

    def __exit__(self, *exc_info):
        self._process.stdin.close()
        self._process.wait()


def _multi_worker_strategy(task, timeout, cleanup=()):
    """MultiWorkerMirroredStrategy for `task`, waiting at most `timeout` seconds for the other workers."""
    leader = "chief" if "chief" in task.cluster else "worker"
    # Configured before the strategy does it, to let a restarted worker (a new incarnation) register again.
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=f"/job:{leader}/replica:0/task:0",
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(task.cluster[job]))
                          for job in ("chief", "worker") if job in task.cluster],
        cluster_register_timeout_in_ms=int(timeout * 1000), allow_new_incarnation_to_reconnect=True)
    # Collectives between CPUs need RING; NCCL (AUTO's choice with GPUs) only works between GPUs.
    gpus = tf.config.list_physical_devices("GPU")
    implementation = tf.distribute.experimental.CommunicationImplementation
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=implementation.AUTO if gpus else implementation.RING)
    with _PeerWatchdog(task, timeout, cleanup):
        try:
            return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                tf.errors.InternalError) as error:
            raise PeerLost(f"{task.name} could not join the cluster ({first_line(error)}).") from None
        except tf.errors.UnknownError as error:
            if "gRPC server" not in str(error):
                raise
            raise ClusterError(f"{task.name} cannot listen on {task.address}: another process holds the port "
                               "(an earlier worker still running?).") from None


# What a worker sees when a peer dies under it: TensorFlow aborts the collectives and the coordination service.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError,
               tf.errors.InternalError, tf.errors.CancelledError)

# Marks an error a worker reported on purpose (`Cluster.report`), which restarting does not cure.
_REPORTED = "tfdogs: "


def first_line(error):
    """The first line of a TensorFlow error's message, for an error message of our own."""
    return (getattr(error, "message", None) or str(error)).strip().splitlines()[0][:300]


class Cluster:
    """What the workers of one multi-worker run tell each other, through TensorFlow's coordination service.

    Values are JSON under "tfdogs/<key>"; the chief publishes, the others wait
    for it (at most the peer timeout).
    """

    def __init__(self, task, timeout):
        self.task, self.timeout = task, timeout

    def publish(self, key, value):
        context.context().set_config_key_value(f"tfdogs/{key}", json.dumps(value))

    def receive(self, key):
        try:
            text = context.context().get_config_key_value(f"tfdogs/{key}", int(self.timeout * 1000))
        except tf.errors.DeadlineExceededError:
            raise ClusterError(f"{self.task.name} waited {self.timeout:g} s for '{key}' from its peers "
                               f"({', '.join(self.task.peers())}); see their output.") from None
        except PEER_ERRORS as error:
            message = getattr(error, "message", None) or str(error)
            if _REPORTED in message:
                raise ClusterError(message[message.index(_REPORTED) + len(_REPORTED):].strip()) from None
            raise PeerLost(f"{self.task.name} lost its peers while waiting for '{key}' "
                           f"({first_line(error)}).") from None
        return json.loads(text)

    def check_same_settings(self, settings, ignore=()):
        """Refuses to go on when any worker was started with other settings; every worker says which.

        Raises:
            ClusterError: naming the task and each differing key with both values.
        """
        # Through JSON on both sides, so a tuple here equals the list it arrives as.
        settings = json.loads(json.dumps({key: value for key, value in settings.items() if key not in ignore}))
        self.publish(f"settings/{self.task.task_type}/{self.task.index}", settings)
        for job, index in self.task.tasks():
            theirs = self.receive(f"settings/{job}/{index}")
            differing = sorted(key for key in settings.keys() | theirs.keys() if settings.get(key) != theirs.get(key))
            if differing:
                changes = "; ".join(f"{key}: {settings.get(key)!r} here, {theirs.get(key)!r} there"
                                    for key in differing)
                raise ClusterError(f"{job} {index} ({self.task.cluster[job][index]}) was started with other "
                                   f"settings than {self.task.name} ({changes}). Start every worker with the "
                                   "same command.")

    def report(self, error):
        """Tells the peers this worker stops, so they stop too instead of waiting out the timeout."""
        try:
            context.context().report_error_to_cluster(tf.errors.ABORTED,
                                                      f"{_REPORTED}{self.task.name} stopped: {error}")
        except Exception:  # the cluster may already be gone; the error itself is what matters here
            pass


def broadcast_from_chief(strategy, variables):
    """Gives every worker the chief's values of `variables` (after the chief alone restored them).

    A sum over all replicas where only replica 0 (the chief's first) adds its
    value: exact, as x + 0 = x. Integer variables travel as float64 (exact
    below 2^53).
    """
    variables = list(variables)
    if not variables:
        return

    def wire_dtype(variable):
        return variable.dtype if variable.dtype in (tf.float32, tf.float64, tf.float16) else tf.float64

    @tf.function
    def summed(values):
        def replica_fn(values):
            replica = tf.distribute.get_replica_context()
            first = tf.equal(replica.replica_id_in_sync_group, 0)
            masked = [tf.where(first, value, tf.zeros_like(value)) for value in values]
            summed = list(masked)
            for dtype in {value.dtype for value in values}:  # one packed all-reduce per dtype
                positions = [i for i, value in enumerate(values) if value.dtype == dtype]
                for i, total in zip(positions, replica.all_reduce("sum", [masked[i] for i in positions])):
                    summed[i] = total
            return summed
        return strategy.run(replica_fn, args=(values,))

    values = [tf.cast(tf.convert_to_tensor(variable), wire_dtype(variable)) for variable in variables]
    results = summed(values)
    for variable, result in zip(variables, results):
        variable.assign(tf.cast(strategy.experimental_local_results(result)[0], variable.dtype))


def per_worker_dataset(strategy, make_dataset):
    """A distributed training set in which each worker builds only its own slice of every global batch.

    Args:
        strategy: the run's MultiWorkerMirroredStrategy.
        make_dataset: `make_dataset(part)` gives the global pipeline's batches
            cut to slice `part` = (index, count) (see `data.make_dataset`).

    Returns:
        A distributed dataset for `model.fit`; a worker with several local
        replicas splits its slice among them in order.
    """
    def dataset_fn(input_context):
        dataset = make_dataset((input_context.input_pipeline_id, input_context.num_input_pipelines))
        local_replicas = strategy.num_replicas_in_sync // input_context.num_input_pipelines
        if local_replicas > 1:
            slice_size = dataset.element_spec[1].shape[0]
            dataset = dataset.rebatch(slice_size // local_replicas)
        return dataset

    return strategy.distribute_datasets_from_function(dataset_fn)


def rejoin():
    """Runs this process's command again (same arguments, same TF_CONFIG), to wait for a restarted peer.

    TensorFlow cannot take a worker back into a running collective group
    (https://www.tensorflow.org/tutorials/distribute/multi_worker_with_keras#fault_tolerance:
    the other workers fail too and must be restarted), so every surviving
    worker starts afresh and all resume from the chief's backup.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
