"""tfdogs: fine-grained dog-breed classification by transfer learning in Keras 3.

Modules:
    data, check: dataset layouts, synthetic data, stratified split, tf.data pipeline; the data check.
    preprocessing: the input preprocessing record that travels with the weights (`RUN/preprocessing.json`).
    augment: Keras preprocessing-layer augmentation, the modern recipe's included, seeded per batch.
    models: LeNet-5, torchvision-identical ResNet-18/34 and keras-hub backbones (`models.build`).
    weights, pth, port: checkpoint registry, reading .pth without torch, PyTorch-to-Keras conversion.
    config: YAML configs, command-line overrides and validation.
    distribute: devices and machines (mirrored, multi-worker).
    train: `python -m tfdogs.train`, the end-to-end experiment (resumable, calibrated).
    metrics, plots: scores, baselines and calibration; the figures.
    export, inference: SavedModel (ensembles, TTA views) and TFLite export with BatchNorms folded.
    evaluate, evaluation_report, gradcam, explain: `python -m tfdogs.evaluate`, its picture report, heat maps.
    compare, report: `python -m tfdogs.compare`, the runs' table, curves and index.html.
    ensemble: `python -m tfdogs.ensemble`, runs averaged into one model and one SavedModel.
    predict, submit: `python -m tfdogs.predict` (top-5 per photo), `python -m tfdogs.submit` (Kaggle CSV).
    zeroshot: the untrained ImageNet classifier as a baseline.
    progress, interruption: progress bars over photos; Ctrl-C and SIGTERM that end with one line.
    bench, measure: `python -m tfdogs.bench`, speed against PyTorch.
"""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) hides the messages
# that matter; keep its errors. A user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
