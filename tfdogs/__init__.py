"""tfdogs: fine-grained dog-breed classification by transfer learning in Keras 3.

Packages, in the order the data flows (each imports only those above it):
    data: layouts, synthetic data, splits, image ops, the preprocessing record, augmentation, tf.data.
    models: LeNet-5, torchvision-identical ResNet-18/34 and keras-hub backbones, built with random weights.
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

import os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) hides the messages
# that matter; keep its errors. A user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
