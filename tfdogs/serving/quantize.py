"""TFLite variants (float32, float16, dynamic, int8) and what each costs: accuracy, size and speed, measured.

Each variant is a converter setting (`configure_converter`). A variant's file
is scored on the run's validation photos against the float model it came
from, fed the same pixels (`measure`), and one that loses more accuracy than
allowed is refused (`check_accuracy_drop`).

- float32: the model as trained.
- float16: weights stored as float16 (half the file); the kernels compute in float32.
- dynamic: dynamic-range quantisation: weights int8, activations quantised on the fly per batch.
- int8: full-integer post-training quantisation: weights and activations int8, their ranges fixed
  from a representative set of training photos; every op runs an int8 kernel
  (`TFLITE_BUILTINS_INT8` only), between a quantise op at the input and a
  dequantise op at the output.

All four take float32 pixels and return float32 probabilities, so an app
feeds every variant alike.
"""

import contextlib
import dataclasses
import os
import pathlib
import platform
import re
import sys
import tempfile
import time
import warnings

import numpy as np
import tensorflow as tf

from tfdogs.evaluation import metrics

VARIANTS = ("float32", "float16", "dynamic", "int8")

# What TFLite's C++ side prints on every conversion or first interpreter, whatever TF_CPP_MIN_LOG_LEVEL says.
_NOTICES = re.compile(r"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.|fully_quantize: \d+, inference_type")


class AccuracyDropError(ValueError):
    """A quantised variant lost more accuracy than `--max-accuracy-drop` allows; nothing was written."""


@dataclasses.dataclass(frozen=True)
class VariantRequest:
    """Which TFLite variant to write, and how it is checked before it is written.

    Attributes:
        variant: one of `VARIANTS`.
        validation_paths: the run's validation photos, on which the variant is scored against float.
        validation_labels: their class indices.
        representative_paths: training photos whose pixels fix int8's activation ranges (int8 only).
        representative_seed: the seed that drew them, recorded.
        max_accuracy_drop: the most accuracy, in percentage points, the variant may lose against float.
        force: write a variant that lost more anyway, recorded as forced.
        threads: interpreter threads for the images-per-second measurement.
    """

    variant: str = "float32"
    validation_paths: tuple = ()
    validation_labels: tuple = ()
    representative_paths: tuple = ()
    representative_seed: int | None = None
    max_accuracy_drop: float = 1.0
    force: bool = False
    threads: int = 1

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"--tflite takes {', '.join(VARIANTS)}; got {self.variant!r}.")
        if not self.validation_paths:
            raise ValueError(f"The {self.variant} TFLite file is scored on the run's validation photos before it "
                             "is written, and none were given.")
        if self.variant == "int8" and not self.representative_paths:
            raise ValueError("--tflite int8 needs representative training photos to fix its activation ranges; "
                             "none were given.")


@contextlib.contextmanager
def quiet_notices():
    """Hides `_NOTICES` from stderr inside the block, so that a command's lines are its own.

    They come from C++ straight to file descriptor 2, so it points at a
    temporary file meanwhile; everything else it caught is written back.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = "".join(line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                           if not _NOTICES.match(line))
            if kept:
                os.write(2, kept.encode())


def choose_representative(paths, count, seed):
    """`count` of `paths` (all when fewer) drawn without replacement by NumPy's generator seeded with `seed`."""
    paths = list(paths)
    chosen = np.random.default_rng(seed).choice(len(paths), size=min(count, len(paths)), replace=False)
    return tuple(paths[index] for index in chosen)


def configure_converter(converter, variant, representative_pixels=None):
    """Sets a `tf.lite.TFLiteConverter` up for one of `VARIANTS`; the input and output stay float32.

    Args:
        converter: a converter from the float model.
        variant: one of `VARIANTS`.
        representative_pixels: int8 only: float32 [N, S, S, 3] inputs, as the file is fed
            (`tflite.tflite_input`), one at a time to the calibration.

    Returns:
        The converter.
    """
    if variant == "float32":
        return converter
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        converter.representative_dataset = lambda: ([image[None]] for image in representative_pixels)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter


def interpreter_probabilities(flatbuffer, pixels, threads=1):
    """A TFLite file's probabilities for `pixels`, one image per invoke, and its images per second.

    Each image is run alone (batch 1), as an app classifies one photo; the
    first run warms the interpreter up and is not timed. The time is that of
    the invokes alone (not the preprocessing).

    Args:
        flatbuffer: the TFLite file's bytes.
        pixels: float32 [N, S, S, 3], `tflite.tflite_input` of each image.
        threads: the interpreter's thread count.

    Returns:
        (float32 [N, classes], images per second).
    """
    with warnings.catch_warnings(), quiet_notices():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's notice that it moves to ai-edge-litert
        interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=threads)
    # the file's one input (images) and one output (probabilities)
    (image_input,), (output,) = ([details["index"] for details in interpreter.get_input_details()],
                                 [details["index"] for details in interpreter.get_output_details()])
    interpreter.resize_tensor_input(image_input, [1, *pixels.shape[1:]])
    with quiet_notices():  # the XNNPACK delegate is made here
        interpreter.allocate_tensors()
        interpreter.set_tensor(image_input, pixels[:1])
        interpreter.invoke()
    probabilities, seconds = [], 0.0
    for image in pixels:
        interpreter.set_tensor(image_input, image[None])
        start = time.perf_counter()
        interpreter.invoke()
        seconds += time.perf_counter() - start
        probabilities.append(interpreter.get_tensor(output)[0].copy())
    return np.stack(probabilities), len(pixels) / seconds


def scored(probabilities, labels):
    """`metrics.scores` with the expected calibration error (`metrics.reliability`, 15 bins)."""
    return {**metrics.scores(probabilities, labels), "ece": metrics.reliability(probabilities, labels)[1]}


def measure(flatbuffer, request, pixels, float_probabilities):
    """The variant's scores on the validation photos against the float model's on the same pixels.

    Args:
        flatbuffer: the converted file's bytes.
        request: the `VariantRequest` (variant, validation labels, threads, representative set).
        pixels: float32 [N, S, S, 3] of the validation photos, `tflite.tflite_input` of each.
        float_probabilities: [N, classes] of the float model (BatchNorms folded, as converted) on `pixels`.

    Returns:
        The facts `tflite.json` holds: variant, representative set, float and variant scores,
        the accuracy change in percentage points, size, images per second, CPU and threads.
    """
    labels = np.asarray(request.validation_labels)
    probabilities, images_per_second = interpreter_probabilities(flatbuffer, pixels, request.threads)
    reference, variant = scored(float_probabilities, labels), scored(probabilities, labels)
    return {
        "variant": request.variant,
        "representative_count": len(request.representative_paths) if request.variant == "int8" else None,
        "representative_seed": request.representative_seed if request.variant == "int8" else None,
        "representative_from": "the run's training photos" if request.variant == "int8" else None,
        "validation_images": int(len(labels)),
        "float": reference,
        "tflite": variant,
        "accuracy_change_points": 100 * (variant["accuracy"] - reference["accuracy"]),
        "size_bytes": len(flatbuffer),
        "images_per_second": images_per_second,
        "batch_size": 1,
        "threads": request.threads,
        "cpu": cpu_name(),
        "max_accuracy_drop_points": request.max_accuracy_drop,
        "forced": False,
    }


def check_accuracy_drop(facts, request):
    """Refuses a variant that lost more than `request.max_accuracy_drop` points, unless forced.

    Returns:
        `facts` with `forced` true when the variant lost more and `request.force` writes it anyway.

    Raises:
        AccuracyDropError: one line saying by how much, naming the flags.
    """
    reference, variant = facts["float"]["accuracy"], facts["tflite"]["accuracy"]
    drop = -facts["accuracy_change_points"]
    # rounded: 1 photo in 100 is 1.0000000000000009 points in floating point
    if round(drop, 9) <= request.max_accuracy_drop:
        return facts
    if request.force:
        return {**facts, "forced": True}
    raise AccuracyDropError(
        f"{facts['variant']} accuracy {100 * variant:.1f} % is {drop:.1f} points below float {100 * reference:.1f} % "
        f"(--max-accuracy-drop {float(request.max_accuracy_drop)}); --force writes it anyway")


def summary_line(facts):
    """One line of a measurement (`measure`'s facts): the variant against float, size and speed."""
    variant, reference = facts["tflite"], facts["float"]
    return (f"{facts['variant']}: accuracy {100 * variant['accuracy']:.1f} % (float {100 * reference['accuracy']:.1f} %, "
            f"{facts['accuracy_change_points']:+.1f} points), log loss {variant['log_loss']:.3f} "
            f"(float {reference['log_loss']:.3f}), ECE {variant['ece']:.3f} (float {reference['ece']:.3f}) on "
            f"{facts['validation_images']} validation photos; {facts['size_bytes']} bytes; "
            f"{facts['images_per_second']:.1f} images/s ({facts['threads']} thread(s), {facts['cpu']})"
            + ("; forced past --max-accuracy-drop" if facts["forced"] else ""))


def cpu_name():
    """The CPU's model name (`/proc/cpuinfo`, as `lscpu` shows it), or what `platform` knows elsewhere."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
