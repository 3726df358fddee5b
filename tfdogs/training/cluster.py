"""Training on several machines: TF_CONFIG, the coordination service, peers lost and rejoined.

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
`fit_under_multi_worker` works around two Keras bugs that stop `fit` under
the multi-worker strategy.
"""

import dataclasses
import json
import os
import subprocess
import sys

import tensorflow as tf
from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
from tensorflow.python.eager import context

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


def multi_worker_strategy(task, timeout, cleanup=()):
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


def fit_under_multi_worker(model):
    """Works around two Keras 3.15 bugs that stop `fit` under MultiWorkerMirroredStrategy.

    1. Before training Keras draws one batch and averages the (images,
       labels) tuple with `strategy.reduce`, which the strategy refuses for
       a tuple ("Attempt to convert a value (PerReplica ...) to a Tensor", the
       crash first reported): only the batch's shapes matter there, and this
       worker's first replica has them.
    2. It averages each step's scalar logs with `strategy.reduce(axis=0)`,
       which fails on a scalar ("Invalid reduction dimension 0"): the steps
       here give them as [1] tensors, which that reduction averages to the
       same scalar.

    Both are Keras' own hooks, replaced on this model only.
    """
    strategy = model.distribute_strategy

    def local(value):
        return strategy.experimental_local_results(value)[0] if isinstance(
            value, tf.distribute.DistributedValues) else value

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(local, next(batches))
                break
        with strategy.scope():  # private, as the hook it replaces (docs/keras-internals.md)
            model._symbolic_build(data_batch=data_batch)

    def vector_logs(step):
        def step_with_vector_logs(data):
            return tf.nest.map_structure(lambda value: tf.reshape(value, [1]) if value.shape.rank == 0 else value,
                                         step(data))
        return step_with_vector_logs

    model._maybe_symbolic_build = maybe_symbolic_build
    model.train_step = vector_logs(model.train_step)
    model.test_step = vector_logs(model.test_step)
