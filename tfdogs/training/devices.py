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

Multi-worker training across machines is `tfdogs.training.cluster`.
"""

import json
import os

import tensorflow as tf

from tfdogs.config.keys import CHOICES
from tfdogs.training.cluster import multi_worker_strategy, peer_timeout, read_task

STRATEGIES = CHOICES["distribute"]


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
        return multi_worker_strategy(task, peer_timeout(), cleanup)
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


def resolve_runtime(config):
    """Chooses XLA, the training precision and the frozen backbone's for the device.

    GPU: XLA and mixed float16. CPU: no XLA (slower there); mixed bfloat16 for
    the ResNets where the CPU computes bfloat16 natively (about 1.5x faster
    steps at float32's validation accuracy, docs/performance.md), else
    float32: LeNet-5 is too small to gain, and EfficientNet-Lite0 fine-tuned
    slower in bfloat16 on an AMX Xeon (whole-network phase 40.0-40.7 s
    against 35.1-36.4 s on dogs10, seeds 0 and 1).

    `frozen_precision` is what a frozen backbone runs in as inference (its
    per-batch features, cached features, the "not a dog" check): with
    `precision` auto, mixed bfloat16 wherever the CPU computes it natively,
    EfficientNet-Lite included (its feature extraction took 8.6-8.7 s of head
    phase against 10.7-11.2 s in float32 there, at the same accuracy);
    otherwise the training precision.
    """
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    jit = {"auto": has_gpu, "on": True, "off": False}[config["jit_compile"]]
    precision = frozen_precision = config["precision"]
    if precision == "auto":
        native = not has_gpu and config["model"] != "lenet5" and cpu_has_native_bfloat16()
        cpu_bfloat16 = native and not config["model"].startswith("efficientnet_lite")
        precision = "mixed_float16" if has_gpu else "mixed_bfloat16" if cpu_bfloat16 else "float32"
        frozen_precision = "mixed_bfloat16" if native else precision
    return {"device": "GPU" if has_gpu else "CPU", "jit_compile": jit, "precision": precision,
            "frozen_precision": frozen_precision}
