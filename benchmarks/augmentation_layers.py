"""CPU seconds of each study augmentation layer on a fixed batch: TensorFlow's resampling kernel against tfdogs'.

    python benchmarks/augmentation_layers.py --repeats 10

Each layer of `build_augmentation()` (flip, rotation, zoom, translation,
contrast) runs alone through `augment_batch` in a `tf.function` on a fixed
random batch (32 images of 224 px by default), once as tfdogs runs it
(rotation, zoom and translation resampled by `tfdogs.data.resample`, compiled
by XLA) and once with the layers' own `ImageProjectiveTransformV3` kernel,
after one warm-up call each. Prints the mean process CPU seconds and wall
seconds per batch, one line per layer and path, and a JSON line.
"""

import argparse
import json
import time

import numpy as np
import tensorflow as tf

from tfdogs.data import augment


def seconds_per_batch(layer, images, repeats):
    """(CPU, wall) seconds per call of `augment_batch(layer, ...)` traced once, a new seed each call."""
    step = tf.function(lambda batch, seed: augment.augment_batch(layer, batch, seed))
    step(images, tf.constant([repeats, 1], tf.int64)).numpy()  # traced and, where XLA runs, compiled
    cpu, wall = time.process_time(), time.perf_counter()
    for index in range(repeats):
        step(images, tf.constant([index, 1], tf.int64)).numpy()
    return (time.process_time() - cpu) / repeats, (time.perf_counter() - wall) / repeats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per layer and path")
    args = parser.parse_args(argv)
    images = tf.constant(np.random.default_rng(0).uniform(
        0, 255, (args.batch_size, args.image_size, args.image_size, 3)).astype(np.float32))
    compiled_layers, results = augment.RESAMPLING_LAYERS, []
    for layer in augment.build_augmentation().layers:
        for path, resampling_layers in (("tfdogs", compiled_layers), ("kernel", ())):
            augment.RESAMPLING_LAYERS = resampling_layers
            try:
                cpu, wall = seconds_per_batch(layer, images, args.repeats)
            finally:
                augment.RESAMPLING_LAYERS = compiled_layers
            results.append({"layer": type(layer).__name__, "path": path, "cpu_seconds": cpu, "wall_seconds": wall})
            print(f"{type(layer).__name__:18} {path:7} CPU {cpu:.4f} s  wall {wall:.4f} s a batch")
    print(json.dumps({"batch_size": args.batch_size, "image_size": args.image_size, "results": results}))


if __name__ == "__main__":
    main()
