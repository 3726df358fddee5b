"""Seconds of one AdamW step over ResNet-18's variables: Keras' own Adam step against tfdogs' fused one.

    python benchmarks/optimizer_step.py --repeats 20

Both optimizers update the 62 trainable variables of tfdogs' ResNet-18 (120
classes, 11.2 M parameters) with the same fixed gradients inside a
`tf.function`: `keras.optimizers.Adam`, whose step is a dozen ops a variable,
and `tfdogs.training.optimizer.make_optimizer("adamw", ...)`, whose step is
TensorFlow's `ResourceApplyAdam` kernel after the decoupled weight decay.
Prints, for each, the first call (tracing it and running it) and the mean
wall and process CPU seconds of the next `--repeats` calls, and a JSON line.
"""

import argparse
import json
import time

import keras
import numpy as np
import tensorflow as tf

from tfdogs import models
from tfdogs.training.optimizer import make_optimizer


def seconds(optimizer, variables, gradients, repeats):
    """(first call, wall per step, CPU per step) of `optimizer.apply_gradients` traced once."""
    optimizer.build(variables)
    step = tf.function(lambda: optimizer.apply_gradients(zip(gradients, variables)))
    wall = time.perf_counter()
    step()
    first = time.perf_counter() - wall
    step()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        step()
    return first, (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per optimizer")
    args = parser.parse_args(argv)
    model = models.build("resnet18", 120, input_shape=(224, 224, 3))
    variables = model.trainable_variables
    rng = np.random.default_rng(0)
    gradients = [tf.constant(rng.normal(size=variable.shape).astype(np.float32) * 1e-3) for variable in variables]
    start = [variable.numpy() for variable in variables]
    results = {}
    for name, optimizer in (("keras Adam", keras.optimizers.Adam(1e-3)),
                            ("tfdogs fused AdamW", make_optimizer("adamw", 1e-3, 0.0, {}, weight_decay=0.01))):
        for variable, value in zip(variables, start):
            variable.assign(value)
        first, wall, cpu = seconds(optimizer, variables, gradients, args.repeats)
        results[name] = {"first_call_s": round(first, 3), "wall_s": round(wall, 4), "cpu_s": round(cpu, 4)}
        print(f"{name:20s} first call {first:.3f} s; a step {wall:.4f} s wall, {cpu:.4f} s CPU")
    print(json.dumps({"variables": len(variables), "parameters": int(sum(np.prod(v.shape) for v in variables)),
                      "repeats": args.repeats, **results}))


if __name__ == "__main__":
    main()
