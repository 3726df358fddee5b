"""Training-curve figures: the two panels the study shows for each model."""

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history, path, title=None):
    """Writes loss and accuracy per epoch, training against validation, as a PNG.

    Args:
        history: `pandas.DataFrame` with columns `epoch` (0-based), `loss`,
            `val_loss`, `accuracy`, `val_accuracy` (`history.csv` of a run).
        path: output PNG path.
        title: optional figure title, e.g. the run name.
    """
    epochs = history["epoch"] + 1
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, metric, label in ((loss_axes, "loss", "loss"), (accuracy_axes, "accuracy", "accuracy")):
        axes.plot(epochs, history[metric], marker="o", label=f"training {label}")
        if f"val_{metric}" in history:
            axes.plot(epochs, history[f"val_{metric}"], marker="o", label=f"validation {label}")
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
