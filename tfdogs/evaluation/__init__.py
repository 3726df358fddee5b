"""Scores and pictures of a model's answers: metrics, calibration, confusions, Grad-CAM, the HTML report.

Modules:
    metrics: accuracy, Kaggle log loss, baselines, temperature calibration, reliability.
    predictions: a model's logits over a dataset; the calibrated model.
    confusion: confusion counts, per-breed accuracy, the most confused pairs.
    zeroshot: the untrained ImageNet classifier restricted to the breeds.
    plots, gradcam: the figures; class-activation heat maps.
    html, report: HTML tables and pages; the evaluation report with pictures.
"""
