"""tfdogs: fine-grained dog-breed classification by transfer learning in Keras 3.

Modules:
    data: dataset layouts, synthetic data, stratified split, tf.data pipeline.
    preprocessing: the input preprocessing record that travels with the weights (`RUN/preprocessing.json`).
    augment: Keras preprocessing-layer augmentation for the training set.
    models: LeNet-5 and torchvision-identical ResNet-18/34 (`models.build`).
    weights, port: ImageNet checkpoint registry and PyTorch-to-Keras conversion.
    config: YAML configs, command-line overrides and validation.
    train: `python -m tfdogs.train`, the end-to-end experiment.
    export: SavedModel export for TF Serving (ensembles too), TFLite export, `python -m tfdogs.export`.
    evaluate: `python -m tfdogs.evaluate`, scores per breed, confused pairs; reads run folders.
    compare, report: `python -m tfdogs.compare`, the runs' table, curves and index.html.
    ensemble: `python -m tfdogs.ensemble`, runs averaged into one model and one SavedModel.
    predict, submit: `python -m tfdogs.predict` (top-5 per photo), `python -m tfdogs.submit` (Kaggle CSV).
"""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) hides the messages
# that matter; keep its errors. A user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
