"""Training-step variants of ResNet-18 on this CPU, each in a fresh process: what closes the gap to PyTorch.

    python benchmarks/train_step_variants.py --repeats 2

Runs each variant alternated with the others (so that drift in the machine's
load hits all alike), at batch 32, 224 px, 120 classes, mixed bfloat16 where
the CPU computes it natively (tfdogs' default), on a fixed random batch; prints
images per second per variant (median of timed windows after a warm-up).

Variants:
    keras_batch_norm       Keras' own BatchNormalization (its moments and normalisation as separate
                           float32 ops), as tfdogs trained before
    fused_batch_norm       as `tfdogs.train` runs a phase now: `configure_phase` makes each
                           BatchNorm's training step one `FusedBatchNormV3` op on the bfloat16 activations
    steps_per_execution_4  fused, and four steps per call of Keras' compiled train function
    blocked_layout         fused, and TF_ENABLE_MKL_NATIVE_FORMAT=0 (oneDNN's blocked layouts between ops)
    one_inter_op_thread    fused, and TF_NUM_INTEROP_THREADS=1 (one op at a time, each on every core)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = {"keras_batch_norm": {}, "fused_batch_norm": {}, "steps_per_execution_4": {},
            "blocked_layout": {"TF_ENABLE_MKL_NATIVE_FORMAT": "0"}, "one_inter_op_thread": {"TF_NUM_INTEROP_THREADS": "1"}}


def measure(variant, steps, warmup):
    import keras
    import numpy as np
    import tensorflow as tf

    from tfdogs import models
    from tfdogs.config.keys import DEFAULTS
    from tfdogs.data.pipeline import without_autotuner
    from tfdogs.training.devices import cpu_has_native_bfloat16
    from tfdogs.training.optimizer import compile_model
    from tfdogs.training.phases import Phase, configure_phase

    precision = "mixed_bfloat16" if cpu_has_native_bfloat16() else "float32"
    keras.mixed_precision.set_dtype_policy(precision)
    model = models.build("resnet18", 120, input_shape=(224, 224, 3))
    configure_phase(model, Phase("all", 0, 1), freeze_bn=False)
    if variant == "keras_batch_norm":
        for layer in model.layers:
            vars(layer).pop("call", None)  # the class's own call
    config = {**DEFAULTS, "optimizer": "adam", "weight_decay": 0.0}
    compile_model(model, config, 1e-3, {}, jit_compile=False)
    if variant == "steps_per_execution_4":
        model.compile(optimizer=model.optimizer, loss=model.loss, steps_per_execution=4)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((32, 224, 224, 3)).astype(np.float32)
    labels = np.eye(120, dtype=np.float32)[rng.integers(0, 120, 32)]
    dataset = without_autotuner(tf.data.Dataset.from_tensors((images, labels)).repeat())  # as tfdogs.train's
    model.fit(dataset, steps_per_epoch=warmup, epochs=1, verbose=0)
    windows, cpu_windows = [], []
    for _ in range(3):
        started, cpu_started = time.perf_counter(), time.process_time()
        model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
        windows.append(32 * steps / (time.perf_counter() - started))
        cpu_windows.append(32 * steps / (time.process_time() - cpu_started))
    # Per CPU-second too: on a shared virtual machine the wall clock also counts time the process was not run.
    return {"variant": variant, "precision": precision, "images_per_second": statistics.median(windows),
            "images_per_cpu_second": statistics.median(cpu_windows)}


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
            results[variant].append((row["images_per_second"], row["images_per_cpu_second"]))
            print(json.dumps(row), flush=True)
    print("\n| variant | images/s (median) | runs | images per CPU-second (median) | runs |\n| --- | --- | --- | --- | --- |")
    for variant, values in results.items():
        wall, cpu = [value[0] for value in values], [value[1] for value in values]
        print(f"| {variant} | {statistics.median(wall):.1f} | {', '.join(f'{value:.1f}' for value in wall)} "
              f"| {statistics.median(cpu):.1f} | {', '.join(f'{value:.1f}' for value in cpu)} |")


if __name__ == "__main__":
    main()
