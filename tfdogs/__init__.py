"""tfdogs: fine-grained dog-breed classification by transfer learning in Keras 3.

Packages, in the order the data flows (each imports only those above it):
    data: layouts, synthetic data, splits, image ops, the preprocessing record, augmentation, tf.data.
    models: LeNet-5, torchvision-identical ResNet-18/34, EfficientNet-Lite0/1/2 and keras-hub backbones,
        built with random weights.
    weights: the checkpoint registry, download, .pth reading and conversion, loaded into built models.
    config: the table of run settings; YAML files and flags.
    evaluation: metrics and calibration, confusions, Grad-CAM, figures, the HTML report.
    serving: BatchNorm folding, SavedModel (ensembles, test-time views) and TFLite export.
    training: phases, optimizer, callbacks, devices and machines, resume, the loop (`training.loop.train`).
    runs: finished run and ensemble folders: evaluation, ensembles, comparison, predictions, submission.
Helpers for all: files (written whole or not at all), progress (progress bars).

Command lines, each a thin module over those: `python -m tfdogs.train`, `check`, `evaluate`,
`compare`, `ensemble`, `predict`, `submit`, `export`, `zeroshot`, `port`, `bench`.
"""

import importlib.util
import os
import re
import sys
import tempfile

__version__ = "0.1.0"

# TensorFlow's C++ log level: 3 keeps only fatal messages. Level 2 would still print "failed call to cuInit"
# on every machine without a GPU (an error by TensorFlow's count).
QUIET_LOG_LEVEL = "3"


def _verbose_two(argv):
    """Whether a command line asks for `--verbose 2` (or `--verbose=2`)."""
    return "--verbose=2" in argv or any(flag == "--verbose" and value == "2" for flag, value in zip(argv, argv[1:]))


def _import_tensorflow_quietly(level):
    """Imports TensorFlow with the C++ messages it prints while loading filtered by `level`.

    TensorFlow reads TF_CPP_MIN_LOG_LEVEL only once its logging is set up, after
    its libraries have loaded and printed their notices ("oneDNN custom
    operations are on", "Could not find cuda drivers"), so those reach stderr at
    any level. Here stderr's file descriptor points at a temporary file while
    TensorFlow loads, and what it held is written back without the lines the
    level hides (and without absl's note that messages came before its set-up).
    """
    hidden = "IWE"[:min(int(level), 3)] if level.isdigit() else ""
    if not hidden or "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return  # Keras on JAX or PyTorch: TensorFlow is not wanted
    try:
        capture = tempfile.TemporaryFile()
    except OSError:  # no writable temporary folder: TensorFlow loads as it would
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        capture.close()
        return
    with capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            # absl's prefix: severity letter, date, time, thread, file:line]
            notice = re.compile(rf"[{hidden}]\d{{4}} \d\d:\d\d:[\d.]+ +\d+ \S+:\d+\] |WARNING: All log messages before "
                                r"absl::InitializeLog")
            kept = "".join(line for line in lines if not notice.match(line))
            if kept:
                os.write(2, kept.encode())


# TensorFlow's oneDNN kernels (convolutions, matrix products, BatchNorm), unless the user chose
# (TF_ENABLE_ONEDNN_OPTS=0). TensorFlow turns them on by itself only on CPUs with AVX-512 VNNI/BF16 or AMX;
# elsewhere its convolutions are Eigen's, and on an AVX2-only AMD EPYC (2 cores) a ResNet-18 training step
# at 224 px, batch 32, ran at 3.1 images/s without them and 6.3 with them (docs/performance.md). Read once,
# as TensorFlow loads: set before the import below.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# Unless the user chose a level (TF_CPP_MIN_LOG_LEVEL) or asked for `--verbose 2`, TensorFlow's C++ start-up
# chatter (oneDNN, CUDA probing) stays hidden, so a command's first lines are its own.
if "TF_CPP_MIN_LOG_LEVEL" not in os.environ and not _verbose_two(sys.argv[1:]):
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = QUIET_LOG_LEVEL
_import_tensorflow_quietly(os.environ.get("TF_CPP_MIN_LOG_LEVEL", ""))
