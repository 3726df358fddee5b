"""Training-step throughput of tfdogs' models through Keras 3's JAX backend, for a GPU without TensorFlow.

On a machine that has JAX (with CUDA) and Keras but no TensorFlow, this
measures what `python -m tfdogs.bench --parts train` measures there: Adam
steps of the model alone on a fixed synthetic batch, after a warm-up, as the
median of timed windows. The models are tfdogs' own (`tfdogs.models` imports
only Keras); the step is one `jax.jit`-compiled function over the stateless
Keras API (XLA, like TensorFlow's `jit_compile`).

    pip install "jax[cuda12]" keras   # or jax[cuda13]: the H200 figures in docs/performance.md
    python benchmarks/jax_gpu_train_step.py --model resnet18 --batch-size 256
    python benchmarks/jax_gpu_train_step.py --precision float32 --batch-size 32   # the CPU table's setting

Mixed float16 (tfdogs' GPU default) uses a fixed loss scale here: the same
arithmetic per step as TensorFlow's dynamic loss scaling, without its
overflow bookkeeping; the script says whether the final loss is finite. It
prints one human line and one JSON line.
"""

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")  # before Keras is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tfdogs import models  # noqa: E402  (Keras only; with KERAS_BACKEND=jax tfdogs does not import TensorFlow)
from tfdogs_measure import load_measure  # noqa: E402  (tfdogs.bench's __init__ would import TensorFlow)

measure = load_measure()

STATIC_LOSS_SCALE = 1024.0


def make_train_step(model, optimizer, loss_scale):
    """A jitted `step(state, images, labels) -> (loss, state)` over Keras' stateless API."""
    loss_function = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def scaled_loss(trainable, non_trainable, images, labels):
        logits, non_trainable = model.stateless_call(trainable, non_trainable, images, training=True)
        loss = loss_function(labels, logits)
        return loss * loss_scale, (loss, non_trainable)

    gradients_of = jax.value_and_grad(scaled_loss, has_aux=True)

    def step(state, images, labels):
        trainable, non_trainable, optimizer_variables = state
        (_, (loss, non_trainable)), gradients = gradients_of(trainable, non_trainable, images, labels)
        gradients = [gradient / loss_scale for gradient in gradients]
        trainable, optimizer_variables = optimizer.stateless_apply(optimizer_variables, gradients, trainable)
        return loss, (trainable, non_trainable, optimizer_variables)

    return jax.jit(step, donate_argnums=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=models.MODEL_NAMES)
    parser.add_argument("--precision", default="mixed_float16",
                        choices=("float32", "mixed_float16", "mixed_bfloat16"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=120)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--window-steps", type=int, default=20)
    parser.add_argument("--windows", type=int, default=5)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_dtype_policy(args.precision)
    try:
        model = models.build(args.model, args.num_classes, input_shape=(args.image_size, args.image_size, 3))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    optimizer = keras.optimizers.Adam(learning_rate=1e-3)
    optimizer.build(model.trainable_variables)
    loss_scale = STATIC_LOSS_SCALE if args.precision == "mixed_float16" else 1.0
    train_step = make_train_step(model, optimizer, loss_scale)

    key_images, key_labels = jax.random.split(jax.random.PRNGKey(0))
    images = jax.random.normal(key_images, (args.batch_size, args.image_size, args.image_size, 3), jnp.float32)
    labels = jax.random.randint(key_labels, (args.batch_size,), 0, args.num_classes)
    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])
    holder = {"state": state, "loss": None}

    def run_steps(steps):
        for _ in range(steps):
            holder["loss"], holder["state"] = train_step(holder["state"], images, labels)

    def synchronize():
        jax.block_until_ready(holder["state"])

    timing = measure.Timing(args.warmup_steps, args.window_steps, args.windows)
    with measure.PeakMemory() as memory:
        result = measure.throughput(run_steps, args.batch_size, timing, synchronize)
    device = jax.devices()[0]
    result.update(model=args.model, precision=args.precision, batch_size=args.batch_size,
                  image_size=args.image_size, device=f"{device.platform}: {device.device_kind}",
                  jax=jax.__version__, keras=keras.__version__, host_peak_rss_mb=memory.peak_mb,
                  final_loss=float(holder["loss"]), loss_finite=bool(jnp.isfinite(holder["loss"])))
    print(f"{args.model} {args.precision} batch {args.batch_size} at {args.image_size} px on "
          f"{result['device']}: {result['images_per_second']:.1f} img/s "
          f"(spread {result['spread_percent']:.0f} %, final loss {result['final_loss']:.3f})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
