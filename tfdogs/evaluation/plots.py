"""Figures: training and validation curves, breed confusions, per-breed accuracy, calibration."""

import functools

import numpy as np

from tfdogs import files


@functools.cache
def _pyplot():
    """matplotlib's pyplot on the Agg backend, imported with the first figure rather than when a command starts.

    The backend is set once, on the first call, so a caller that switches it
    afterwards keeps its choice.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot

    return matplotlib.pyplot


def plot_curves(history, path, title=None):
    """Writes loss and accuracy per epoch, training against validation, as a PNG.

    Args:
        history: `pandas.DataFrame` with columns `epoch` (0-based), `loss`,
            `val_loss`, `accuracy`, `val_accuracy` (`history.csv` of a run).
        path: output PNG path.
        title: optional figure title, e.g. the run name.
    """
    epochs = history["epoch"] + 1
    plt = _pyplot()
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
    _save(figure, path)


def plot_validation_overlay(histories, path, *, reference_lines=None, title=None):
    """Overlays the validation curves of several runs: accuracy and log loss per epoch.

    Args:
        histories: mapping from run name to its `history.csv` DataFrame
            (`epoch`, `val_accuracy`, and `val_log_loss` or `val_loss`).
        path: output PNG path.
        reference_lines: optional mapping from a label to a dict with
            `accuracy` and/or `log_loss` (and optionally a matplotlib `color`,
            default grey), drawn as horizontal dashed lines: baselines, an
            ensemble's score.
        title: optional figure title.
    """
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, history in histories.items():
        epochs = history["epoch"] + 1
        (line,) = accuracy_axes.plot(epochs, history["val_accuracy"], marker="o", markersize=3, label=name)
        loss_column = "val_log_loss" if "val_log_loss" in history else "val_loss"
        loss_axes.plot(epochs, history[loss_column], marker="o", markersize=3, color=line.get_color(), label=name)
    styles = iter(["--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 3))] * 4)
    for label, values in (reference_lines or {}).items():
        style = next(styles)
        for axes, key in ((accuracy_axes, "accuracy"), (loss_axes, "log_loss")):
            if values.get(key) is not None:
                axes.axhline(values[key], linestyle=style, color=values.get("color", "grey"), linewidth=1,
                             label=f"{label} ({values[key]:.3g})")
    for axes, label in ((accuracy_axes, "validation accuracy"), (loss_axes, "validation log loss")):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    _save(figure, path)


def plot_confused_pairs(counts, class_names, pairs, path, title=None):
    """The most-confused breed pairs as bars, beside the confusion counts among those breeds.

    A 120 x 120 confusion matrix is unreadable; restricted to the breeds of the
    worst pairs it shows who is taken for whom.

    Args:
        counts: confusion matrix, counts[true, predicted].
        class_names: breed names in class-index order.
        pairs: DataFrame from `tfdogs.evaluate.most_confused_pairs`.
        path: output PNG path.
        title: optional figure title.
    """
    plt = _pyplot()
    figure, (bars_axes, matrix_axes) = plt.subplots(1, 2, figsize=(13, 5.5))
    if len(pairs):
        labels = [f"{a} / {b}" for a, b in zip(pairs["breed_a"], pairs["breed_b"])][::-1]
        a_as_b, b_as_a = pairs["a_as_b"].to_numpy()[::-1], pairs["b_as_a"].to_numpy()[::-1]
        bars_axes.barh(labels, a_as_b, label="true: first, predicted: second")
        bars_axes.barh(labels, b_as_a, left=a_as_b, label="true: second, predicted: first")
        bars_axes.legend(fontsize="small")
        breeds = list(dict.fromkeys(list(pairs["breed_a"]) + list(pairs["breed_b"])))
    else:
        bars_axes.text(0.5, 0.5, "no confusions", ha="center", va="center", transform=bars_axes.transAxes)
        breeds = list(class_names[:10])
    bars_axes.set_xlabel("images confused")
    index = [class_names.index(breed) for breed in breeds]
    sub = counts[np.ix_(index, index)]
    image = matrix_axes.imshow(sub, cmap="Blues")
    matrix_axes.set_xticks(range(len(breeds)), breeds, rotation=60, ha="right", fontsize="small")
    matrix_axes.set_yticks(range(len(breeds)), breeds, fontsize="small")
    matrix_axes.set_xlabel("predicted")
    matrix_axes.set_ylabel("true")
    if len(breeds) <= 20:
        for row in range(len(breeds)):
            for column in range(len(breeds)):
                if sub[row, column]:
                    matrix_axes.text(column, row, int(sub[row, column]), ha="center", va="center",
                                     fontsize="x-small",
                                     color="white" if sub[row, column] > sub.max() / 2 else "black")
    figure.colorbar(image, ax=matrix_axes, fraction=0.046)
    if title:
        figure.suptitle(title)
    _save(figure, path)


def plot_reliability(tables, path, title=None):
    """Reliability diagram: accuracy against confidence per bin, one line per set of probabilities.

    Args:
        tables: {label: (table, ece)} from `metrics.reliability`, e.g. raw and calibrated.
        path: output PNG path.
        title: optional figure title.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    for label, (table, ece) in tables.items():
        filled = ~np.isnan(table["confidence"])
        axes.plot(table["confidence"][filled], table["accuracy"][filled], marker="o",
                  label=f"{label} (ECE {ece:.3f})")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence (top probability)")
    axes.set_ylabel("accuracy")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left")
    if title:
        axes.set_title(title)
    _save(figure, path)


def _save(figure, path):
    """Lays out, writes (PNG, 100 dpi) and closes a figure."""
    figure.tight_layout()
    try:
        files.replace_into(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    finally:
        _pyplot().close(figure)


def plot_confusion_heat_map(counts, class_names, order, path, title=None):
    """The whole confusion matrix as a heat map, rows and columns in `order`, every breed labelled.

    Cells show each true breed's share of images given each answer (rows sum to
    1), on a square-root colour scale so that a few confusions among many
    correct answers still show. Sized to stay readable at 120 breeds.

    Args:
        counts: confusion matrix, counts[true, predicted].
        class_names: breed names in class-index order.
        order: class indices in display order (confused breeds together, see
            `tfdogs.evaluation.report.confusion_order`).
        path: output PNG path.
        title: optional figure title.
    """
    from matplotlib.colors import PowerNorm

    order = list(order)
    counts = np.asarray(counts)[np.ix_(order, order)]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    names = [class_names[index] for index in order]
    side = max(6.0, 0.15 * len(names) + 3)  # 0.15 in (15 px) per breed fits a 7-point label
    font = 9 if len(names) <= 30 else 7
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(side + 1, side))
    image = axes.imshow(shares, cmap="magma_r", norm=PowerNorm(0.5, vmin=0, vmax=1),
                        interpolation="nearest")
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=font)
    axes.set_yticks(range(len(names)), names, fontsize=font)
    axes.set_xlabel("predicted breed")
    axes.set_ylabel("true breed")
    axes.set_xticks(np.arange(len(names) + 1) - 0.5, minor=True)
    axes.set_yticks(np.arange(len(names) + 1) - 0.5, minor=True)
    axes.grid(which="minor", color="#eeeeee", linewidth=0.3)
    axes.tick_params(which="minor", length=0)
    figure.colorbar(image, ax=axes, fraction=0.03, pad=0.01, label="share of the true breed's images")
    if title:
        axes.set_title(title)
    _save(figure, path)


def plot_breed_accuracy(breeds, path, overall=None, title=None):
    """Per-breed accuracy as horizontal bars, worst breed at the top.

    Args:
        breeds: DataFrame with `breed`, `accuracy` and `images` (from
            `tfdogs.evaluate.per_breed_accuracy`); breeds without images are left out.
        path: output PNG path.
        overall: accuracy over all images, drawn as a dashed line.
        title: optional figure title.
    """
    breeds = breeds.dropna(subset=["accuracy"]).sort_values(["accuracy", "breed"], kind="stable")
    height = max(3.0, 0.16 * len(breeds) + 1.5)
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, height))
    labels = [f"{breed} ({images})" for breed, images in zip(breeds["breed"], breeds["images"])]
    positions = np.arange(len(breeds))[::-1]  # worst first, at the top
    axes.barh(positions, breeds["accuracy"], color=plt.cm.RdYlGn(breeds["accuracy"].to_numpy()), height=0.8)
    axes.set_yticks(positions, labels, fontsize=9 if len(breeds) <= 40 else 7)
    axes.set_ylim(-0.6, len(breeds) - 0.4)
    axes.set_xlim(0, 1)
    axes.set_xlabel("accuracy (images of the breed in brackets)")
    if overall is not None:
        axes.axvline(overall, color="black", linestyle="--", linewidth=1, label=f"all images ({overall:.1%})")
        axes.legend(loc="lower right", fontsize="small")
    axes.grid(axis="x", alpha=0.3)
    if title:
        axes.set_title(title)
    _save(figure, path)


def plot_rate_sweep(rates, losses, smoothed, suggestion, path, title=None):
    """The learning-rate finder's curve: each batch's loss and the smoothed loss against the rate (log scale),
    the suggested rate and a tenth of the minimum's rate marked (`tfdogs.training.lr_finder.Suggestion`)."""
    figure, axis = _pyplot().subplots(figsize=(7, 4.5))
    axis.plot(rates, losses, color="0.75", linewidth=1, label="batch loss")
    axis.plot(rates, smoothed, color="C0", linewidth=2, label="smoothed loss")
    axis.axvline(suggestion.steepest, color="C3", linestyle="--",
                 label=f"steepest descent {suggestion.steepest:.2g} (suggested)")
    axis.axvline(suggestion.minimum / 10, color="C2", linestyle=":",
                 label=f"minimum / 10 {suggestion.minimum / 10:.2g}")
    axis.set_xscale("log")
    finite = np.asarray(smoothed)[np.isfinite(smoothed)]
    if finite.size:  # the blow-up at the end would flatten the rest of the curve
        axis.set_ylim(finite.min() - 0.05 * abs(finite.min()), min(finite.max(), 4 * finite.min()) * 1.05)
    axis.set_xlabel("learning rate")
    axis.set_ylabel("training loss")
    axis.legend()
    axis.set_title(title or "learning-rate sweep")
    _save(figure, path)
