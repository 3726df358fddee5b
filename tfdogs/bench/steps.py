"""One measurement each: the input pipeline, the training step, inference from a SavedModel; run in a process of its own."""

import dataclasses
import io
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np

from tfdogs import models
from tfdogs.bench import measure
from tfdogs.serving.fold import fold_batch_norms
from tfdogs.training.optimizer import make_optimizer
from tfdogs.training.phases import Phase, configure_phase

PARTS = ("pipeline", "train", "inference")
REPOSITORY = pathlib.Path(__file__).resolve().parents[2]  # tfdogs/bench/steps.py -> the checkout
TORCH_SCRIPT = REPOSITORY / "benchmarks" / "torch_bench.py"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The Kaggle photos' median size, for the generated stand-ins when no --data-dir is given.
PHOTO_SIZE = (500, 375)
# The models `benchmarks/torch_bench.py` builds in torchvision; keras_hub:PRESET models are measured in tfdogs alone.
TORCH_MODELS = ("lenet5", "resnet18", "resnet34")

# (part, model, image size) -> (PyTorch setting compared against, lowest ratio that meets the target)
TARGETS = {
    ("pipeline", None, None): ("dataloader", 3.0),
    ("train", "resnet18", 224): ("tuned", 1.2),
    ("inference", "resnet18", 224): ("tuned", 1.0),
}

COLUMNS = ("part", "model", "framework", "setting", "batch_size", "image_size", "images_per_second",
           "spread_percent", "peak_rss_mb", "parameters", "ratio_vs_torch", "ratio_vs_torch_tuned", "target",
           "target_met")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way of running tfdogs: a Keras dtype policy, XLA or not, serving options, environment variables.

    `bfloat16_rewrite` turns on TensorFlow's oneDNN bfloat16 graph rewrite
    (`auto_mixed_precision_onednn_bfloat16`) in the process that loads a
    float32 SavedModel. `environment` is applied before TensorFlow starts,
    so it takes effect only in a fresh (isolated) measurement process.
    """

    name: str
    precision: str = "float32"
    jit_compile: bool = False
    bfloat16_rewrite: bool = False
    environment: tuple = ()


def tensorflow_settings(part, has_gpu, bfloat16_cpu):
    """The settings worth measuring for a part on this device.

    Training: float32 and the mixed precision the device computes fast.
    Inference: the float32 SavedModel that training exports, plain and, on a
    CPU with native bfloat16, served with the bfloat16 rewrite.
    """
    if part == "train":
        if has_gpu:
            return [Setting("float32"), Setting("mixed_float16+xla", "mixed_float16", jit_compile=True)]
        return [Setting("float32")] + ([Setting("mixed_bfloat16", "mixed_bfloat16")] if bfloat16_cpu else [])
    settings = [Setting("float32")]
    if bfloat16_cpu and not has_gpu:
        settings.append(Setting("float32+bf16 rewrite", bfloat16_rewrite=True))
    return settings


# ----------------------------------------------------------------------------- data


def make_photo_like_jpegs(directory, count=256, size=PHOTO_SIZE, seed=0):
    """Writes `count` JPEGs of `size` (width, height) that decode like photos.

    Shapes on a noisy background, drawn at half resolution and enlarged (as
    smooth as a photo), saved at quality 85: about 40 kB each, near the
    Kaggle photos' 34 kB at 500x375. Returns the file paths.
    """
    from PIL import Image

    from tfdogs import data

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    side = max(width, height)
    paths = []
    for index in range(count):
        square = Image.fromarray(data.synthetic_image(rng, index % 8, 8, side // 2)).resize(
            (side, side), Image.BILINEAR)
        top, left = (side - height) // 2, (side - width) // 2
        buffer = io.BytesIO()
        square.crop((left, top, left + width, top + height)).save(buffer, format="JPEG", quality=85)
        path = directory / f"photo-{index:04d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(str(path))
    return paths


def jpeg_files(data_dir, workdir):
    """JPEG paths from a Kaggle or class-folder directory, or generated stand-ins."""
    if data_dir is None:
        return make_photo_like_jpegs(pathlib.Path(workdir) / "photos", count=1024)
    from tfdogs import data

    return data.find_records(data_dir).paths


# ----------------------------------------------------------------------------- TensorFlow measurements


def measure_pipeline(paths, *, cache, image_size, batch_size, workers, crop_scale_min, timing):
    """Training pipeline throughput: decode, crop, flip, normalise, with `workers` tf.data threads.

    Without the cache the file list is repeated into one long epoch (as the
    DataLoader's is); with it, the cache is filled during the warm-up (one
    whole epoch) and the timed windows read decoded images from memory.
    The flip is `make_dataset`'s per-image one (`flip=True`, no Keras block).
    """
    import tensorflow as tf

    from tfdogs import data

    steps_needed = timing.warmup_steps + timing.window_steps * timing.windows + 1
    # At least 1024 entries per epoch (the list repeated), so epoch boundaries cost what they cost in a
    # real epoch of thousands of photos; the cache then holds each photo as often as it is listed.
    files = list(paths) * max(1, math.ceil(1024 / len(paths)))
    if cache:
        timing = dataclasses.replace(
            timing, warmup_steps=max(timing.warmup_steps, math.ceil(len(files) / batch_size) + 1))
    else:
        files = (files * (steps_needed * batch_size // len(files) + 1))[:max(steps_needed * batch_size, len(files))]
    dataset = data.make_dataset(
        files, np.zeros(len(files), np.int64), image_size=image_size, batch_size=batch_size, training=True,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, flip=True, cache="memory" if cache else None,
        shuffle_buffer=min(len(files), 1024), scale=(crop_scale_min, 1.0))
    options = tf.data.Options()
    options.threading.private_threadpool_size = workers  # as many threads as the DataLoader has workers
    batches = iter(dataset.repeat().with_options(options))

    def run_steps(steps):
        for _ in range(steps):
            next(batches)

    return measure.throughput(run_steps, batch_size, timing)


def _build(model_name, setting, *, image_size, num_classes):
    """The model with fresh weights under the setting's dtype policy.

    A ``keras_hub:PRESET`` model is built from the preset's architecture alone
    (its weights are not read: speed does not depend on their values).
    """
    import keras

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_dtype_policy(setting.precision)
    try:
        return models.build(model_name, num_classes, input_shape=(image_size, image_size, 3))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def _random_batch(batch_size, image_size, num_classes):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, image_size, image_size, 3), dtype=np.float32)
    return images, rng.integers(0, num_classes, batch_size).astype(np.int32)


def measure_training(model_name, setting, *, image_size, batch_size, num_classes, timing):
    """Training-step throughput of `model.fit` on a fixed batch (model only, no input cost)."""
    import keras
    import tensorflow as tf

    from tfdogs.data.pipeline import without_autotuner

    model = _build(model_name, setting, image_size=image_size, num_classes=num_classes)
    configure_phase(model, Phase("all", 0, 1), freeze_bn=False)  # as tfdogs.train sets a phase up (fused BatchNorm)
    model.compile(optimizer=make_optimizer("adam", 1e-3, 0.9, {}),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=setting.jit_compile)
    # As tfdogs.train's pipelines: tf.data's autotuner off (with it, steps stalled on 2 cores).
    batch = _random_batch(batch_size, image_size, num_classes)
    dataset = without_autotuner(tf.data.Dataset.from_tensors(batch).repeat())

    def run_steps(steps):
        model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)

    result = measure.throughput(run_steps, batch_size, timing)
    result.update(jit_compile=bool(model.jit_compile), parameters=model.count_params())
    return result


def measure_inference(model_name, setting, *, image_size, batch_size, num_classes, timing, workdir):
    """Throughput of the model as `tfdogs.train` exports it (BatchNorms folded), loaded back as a SavedModel.

    The SavedModel holds the model alone (`model.export`: no JPEG decoding
    or resizing, as the PyTorch side does none); the model is exported and
    dropped before the measurement starts, so the memory peak is that of a
    serving process.
    """
    import gc

    import keras
    import tensorflow as tf


    model = fold_batch_norms(_build(model_name, setting, image_size=image_size, num_classes=num_classes))
    parameters = model.count_params()  # after folding: what the SavedModel serves
    export_dir = pathlib.Path(workdir) / f"savedmodel-{models.file_name(model_name)}-{setting.name}".replace(" ", "-")
    model.export(str(export_dir), format="tf_saved_model", verbose=False)
    del model
    keras.backend.clear_session()
    gc.collect()
    if setting.bfloat16_rewrite:
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
    with measure.PeakMemory() as memory:
        loaded = tf.saved_model.load(str(export_dir))
        serve = loaded.serve  # `loaded` owns the variables; keep it alive
        images = tf.constant(_random_batch(batch_size, image_size, num_classes)[0])

        def run_steps(steps):
            for _ in range(steps):
                serve(images)

        result = measure.throughput(run_steps, batch_size, timing)
    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": False})
    result.update(peak_rss_mb=memory.peak_mb, parameters=parameters)
    return result


def run_job(job):
    """Runs one TensorFlow measurement described by a JSON-able dict; returns its result dict."""
    timing = measure.Timing(**job["timing"])
    setting = Setting(**{**job["setting"], "environment": tuple(map(tuple, job["setting"]["environment"]))})
    common = dict(image_size=job["image_size"], batch_size=job["batch_size"], timing=timing)
    with measure.PeakMemory() as memory:
        if job["part"] == "pipeline":
            result = measure_pipeline(job["paths"], cache=job["cache"], workers=job["workers"],
                                      crop_scale_min=job["crop_scale_min"], **common)
        elif job["part"] == "train":
            result = measure_training(job.get("build", job["model"]), setting, num_classes=job["num_classes"],
                                      **common)
        else:
            result = measure_inference(job.get("build", job["model"]), setting, num_classes=job["num_classes"],
                                       workdir=job["workdir"], **common)
    result.setdefault("peak_rss_mb", memory.peak_mb)
    return result


def _last_json_line(text, command):
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{' '.join(map(str, command))} printed no result:\n{text[-2000:]}")


def run_isolated(job):
    """`run_job` in a fresh Python process with the setting's environment variables."""
    environment = {**os.environ, **dict(job["setting"]["environment"])}
    command = [sys.executable, "-m", "tfdogs.bench", "--job", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPOSITORY)
    if done.returncode:
        raise RuntimeError(f"benchmark job failed ({done.returncode}): {job['part']} {job.get('model')}\n"
                           f"{done.stderr[-3000:]}")
    return _last_json_line(done.stdout, command[:3])


# ----------------------------------------------------------------------------- PyTorch side
