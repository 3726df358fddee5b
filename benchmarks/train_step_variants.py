"""Training-step variants of ResNet-18 on this CPU, each in a fresh process: what closes the gap to PyTorch.

    python benchmarks/train_step_variants.py --repeats 2

Runs each variant alternated with the others (so that drift in the machine's
load hits all alike), at batch 32, 224 px, 120 classes, mixed bfloat16 where
the CPU computes it natively (tfdogs' default), on a fixed random batch; prints
images per second per variant (median of timed windows after a warm-up).

Variants:
    baseline               `tfdogs.training.optimizer.compile_model`, as `tfdogs.train` runs it
    steps_per_execution_4  four steps per call of Keras' compiled train function
    fused_batch_norm       BatchNorm's training statistics and normalisation in one
                           `FusedBatchNormV3` op on the bfloat16 activations
    blocked_layout         TF_ENABLE_MKL_NATIVE_FORMAT=0 (oneDNN's blocked layouts between ops)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = {"baseline": {}, "steps_per_execution_4": {}, "fused_batch_norm": {},
            "blocked_layout": {"TF_ENABLE_MKL_NATIVE_FORMAT": "0"}}


def fused_batch_norm_call(layer, inputs, training=None, mask=None):
    """Keras BatchNormalization's training branch as one fused op (inference as Keras does it)."""
    import keras
    import tensorflow as tf

    if not training or not layer.trainable:
        return keras.layers.BatchNormalization.call(layer, inputs, training=training, mask=mask)
    y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=tf.cast(layer.gamma, tf.float32), offset=tf.cast(layer.beta, tf.float32),
        mean=tf.constant([], tf.float32), variance=tf.constant([], tf.float32), epsilon=layer.epsilon,
        data_format="NHWC", is_training=True)
    count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
    variance = variance * count / tf.maximum(count - 1.0, 1.0)  # FusedBatchNormV3 returns the unbiased one
    momentum = layer.momentum
    layer.moving_mean.assign(layer.moving_mean * momentum + tf.cast(mean, layer.moving_mean.dtype) * (1 - momentum))
    layer.moving_variance.assign(layer.moving_variance * momentum
                                 + tf.cast(variance, layer.moving_variance.dtype) * (1 - momentum))
    return y


def measure(variant, steps, warmup):
    import keras
    import numpy as np
    import tensorflow as tf

    from tfdogs import models
    from tfdogs.training.devices import cpu_has_native_bfloat16
    from tfdogs.training.optimizer import compile_model

    precision = "mixed_bfloat16" if cpu_has_native_bfloat16() else "float32"
    keras.mixed_precision.set_dtype_policy(precision)
    model = models.build("resnet18", 120, input_shape=(224, 224, 3))
    if variant == "fused_batch_norm":
        import types
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.call = types.MethodType(fused_batch_norm_call, layer)
    config = {"optimizer": "adam", "momentum": 0.9, "weight_decay": 0.0, "ema": 0.0, "label_smoothing": 0.0}
    compile_model(model, config, 1e-3, {}, jit_compile=False)
    if variant == "steps_per_execution_4":
        model.compile(optimizer=model.optimizer, loss=model.loss, steps_per_execution=4)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((32, 224, 224, 3)).astype(np.float32)
    labels = np.eye(120, dtype=np.float32)[rng.integers(0, 120, 32)]
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    model.fit(dataset, steps_per_epoch=warmup, epochs=1, verbose=0)
    windows = []
    for _ in range(3):
        started = time.perf_counter()
        model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
        windows.append(32 * steps / (time.perf_counter() - started))
    return {"variant": variant, "precision": precision, "images_per_second": statistics.median(windows)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(measure(args.job, args.steps, args.warmup)))
        return
    results = {variant: [] for variant in args.variants}
    for _ in range(args.repeats):
        for variant in args.variants:
            done = subprocess.run([sys.executable, __file__, "--job", variant, "--steps", str(args.steps),
                                   "--warmup", str(args.warmup)], capture_output=True, text=True,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **VARIANTS[variant]}, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            results[variant].append(row["images_per_second"])
            print(json.dumps(row), flush=True)
    print("\n| variant | images/s (median) | runs |\n| --- | --- | --- |")
    for variant, values in results.items():
        print(f"| {variant} | {statistics.median(values):.1f} | {', '.join(f'{value:.1f}' for value in values)} |")


if __name__ == "__main__":
    main()
