"""The evaluation report: one page of pictures of what a model gets wrong.

`python -m tfdogs.evaluate RUN` calls `write_report`, which writes
`RUN/evaluation/report/` (or `report/` under evaluate's `--output`):

    index.html          the page; opens from disk, every picture by a relative path
    predictions.csv     per image: path, true breed, its probability, loss, the top-5 breeds and probabilities
    thumbnails/         128 px JPEGs of the photos shown
    heat_maps/          Grad-CAM overlays (`tfdogs.evaluation.gradcam`) of the top-loss photos
    confusion_matrix.png, breed_accuracy.png, reliability.png (and calibration.png, the run's own)

The page shows the photos with the highest loss, each most-confused breed
pair with example photos of both breeds side by side, the whole confusion
matrix ordered so that breeds confused with each other sit together, the
per-breed accuracy, the reliability diagram and where the network looked in
the top-loss photos. A 120-breed report is about 1-2 MB: only the photos
shown get thumbnails.
"""

import html
import json
import pathlib
import shutil

import keras
import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from tfdogs import files
from tfdogs.evaluation import gradcam, metrics, plots
from tfdogs.evaluation.html import STYLE

THUMBNAIL_SIZE = 128

PAGE_STYLE = STYLE + """
nav a { margin-right: 1em; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.gallery figure, .pair figure, .explained figure { margin: 0; width: 136px; font-size: 0.75em; }
.gallery img, .pair img, .explained img { display: block; max-width: 128px; max-height: 128px; border: 1px solid #ccc; }
figcaption .wrong { color: #b00020; }
figcaption .right { color: #0a7a2f; }
.pair { display: flex; gap: 24px; margin: 0.5em 0 1.5em; flex-wrap: wrap; }
.pair > div { display: flex; gap: 8px; align-items: flex-start; }
.pair h3 { font-size: 0.95em; margin: 0.2em 0; }
.explained { display: flex; flex-wrap: wrap; gap: 18px; }
.explained > div { display: flex; gap: 4px; border: 1px solid #eee; padding: 4px; }
"""


def per_image_loss(probabilities, labels):
    """Each image's share of the Kaggle log loss: -ln p(true breed), clipped and renormalised as `metrics.log_loss`."""
    clipped = np.clip(np.asarray(probabilities, np.float64), metrics.KAGGLE_EPSILON, 1 - metrics.KAGGLE_EPSILON)
    clipped /= clipped.sum(axis=1, keepdims=True)
    return -np.log(clipped[np.arange(len(labels)), np.asarray(labels)])


def predictions_table(paths, labels, probabilities, class_names):
    """One row per image: path, true breed and its probability, loss, correct, top-5 breeds and probabilities."""
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :min(5, len(class_names))]
    columns = {
        "path": [str(path) for path in paths],
        "true_breed": [class_names[label] for label in labels],
        "true_probability": probabilities[np.arange(len(labels)), labels],
        "loss": per_image_loss(probabilities, labels),
        "correct": top[:, 0] == np.asarray(labels),
    }
    for rank in range(top.shape[1]):
        columns[f"top{rank + 1}_breed"] = [class_names[index] for index in top[:, rank]]
        columns[f"top{rank + 1}_probability"] = probabilities[np.arange(len(labels)), top[:, rank]]
    return pd.DataFrame(columns)


def confusion_order(counts):
    """Class indices ordered so that breeds confused with each other sit together.

    Average-linkage agglomerative clustering of the symmetrised confusion
    rates (each row divided by its breed's images, the matrix added to its
    transpose, the diagonal ignored): the two groups confused most on average
    merge first, joined at the ends that are confused most, and the final
    group's order is the result. Breeds never confused keep their index order
    at the end. Plain numpy, O(C^3): a few milliseconds at 120 breeds.

    Args:
        counts: [C, C] confusion counts, counts[true, predicted].

    Returns:
        A permutation of range(C), as a list.
    """
    counts = np.asarray(counts, np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    similarity = rates + rates.T
    np.fill_diagonal(similarity, 0)
    linkage = similarity.copy()
    np.fill_diagonal(linkage, -np.inf)
    groups = {index: [index] for index in range(len(counts))}
    while len(groups) > 1:
        active = sorted(groups)
        block = linkage[np.ix_(active, active)]
        first, second = np.unravel_index(np.argmax(block), block.shape)
        a, b = sorted((active[first], active[second]))
        if block[first, second] <= 0:  # nothing left is confused: keep the rest in index order
            break
        left, right = groups[a], groups[b]
        # Join the ends that are confused most: try each orientation of both groups.
        left, right = max(((l, r) for l in (left, left[::-1]) for r in (right, right[::-1])),
                          key=lambda pair: similarity[pair[0][-1], pair[1][0]])
        sizes = len(groups[a]), len(groups[b])
        merged_row = (sizes[0] * linkage[a] + sizes[1] * linkage[b]) / sum(sizes)
        linkage[a], linkage[:, a] = merged_row, merged_row
        linkage[a, a] = -np.inf
        linkage[b], linkage[:, b] = -np.inf, -np.inf
        groups[a] = left + right
        del groups[b]
    # Confused groups first, largest first; then the breeds never confused.
    ordered = sorted(groups.values(), key=lambda members: (len(members) == 1, -len(members), members[0]))
    return [index for members in ordered for index in members]


class _Pictures:
    """Thumbnails of photos, each written once, named by the photo's position in the evaluation."""

    def __init__(self, folder):
        self.folder = pathlib.Path(folder)
        (self.folder / "thumbnails").mkdir(parents=True, exist_ok=True)
        self.written = {}

    def thumbnail(self, index, path):
        """The page-relative path of the photo's thumbnail, or None when the photo cannot be opened."""
        if index not in self.written:
            relative = f"thumbnails/{index:05d}.jpg"
            try:
                with Image.open(path) as image:
                    image = ImageOps.exif_transpose(image).convert("RGB")
                    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.BILINEAR)
                    image.save(self.folder / relative, "JPEG", quality=80)
            except OSError:
                relative = None
            self.written[index] = relative
        return self.written[index]


def _figure(src, caption_html, alt):
    image = f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">' if src else "<p>(unreadable photo)</p>"
    return f"<figure>{image}<figcaption>{caption_html}</figcaption></figure>"


def _caption(row):
    verdict = "right" if row["correct"] else "wrong"
    return (f"true: {html.escape(row['true_breed'])} ({row['true_probability']:.1%})<br>"
            f'<span class="{verdict}">predicted: {html.escape(row["top1_breed"])} '
            f"({row['top1_probability']:.1%})</span><br>loss {row['loss']:.2f}")


def _examples(table, breed, other, count):
    """Indices of up to `count` photos of `breed`: first those taken for `other`, then the hardest of the rest."""
    of_breed = table[table["true_breed"] == breed]
    mistaken = of_breed[of_breed["top1_breed"] == other].sort_values("loss", ascending=False)
    rest = of_breed.drop(mistaken.index).sort_values("loss", ascending=False)
    return list(pd.concat([mistaken, rest]).index[:count])


def write_report(folder, *, title, paths, labels, probabilities, class_names, counts, breeds, pairs,
                 models, preprocessings, member_weights=None, source="", scores=None, run_dir=None, top_losses=24,
                 explained=12, examples_per_breed=3, links=()):
    """Writes the evaluation report page and its pictures.

    Args:
        folder: the report folder (created).
        title: page title, e.g. the run's name.
        paths: the evaluated image files.
        labels: their true class indices.
        probabilities: [N, C] predicted probabilities.
        class_names: breed names in class-index order.
        counts: confusion matrix, counts[true, predicted].
        breeds: per-breed accuracy (`tfdogs.evaluate.per_breed_accuracy`).
        pairs: most-confused pairs (`tfdogs.evaluate.most_confused_pairs`).
        models: the Keras classifiers (one for a run, the members of an ensemble), for the heat maps.
        preprocessings: each model's `Preprocessing`.
        member_weights: an ensemble's member weights (None: equal); its heat maps are the
            members' maps averaged with them, as its probabilities are.
        source: a sentence on what was evaluated.
        scores: `metrics.scores` of the probabilities, shown at the top.
        run_dir: the run (or ensemble) folder, for its `calibration.png` and `metrics.json`.
        top_losses: photos in the top-loss gallery.
        explained: top-loss photos given heat maps.
        examples_per_breed: photos of each breed of a confused pair.
        links: extra (text, page-relative path) pairs shown at the top.

    Returns:
        The path of `index.html`.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, np.float64)
    table = predictions_table(paths, labels, probabilities, class_names)
    files.replace_into(folder / "predictions.csv",
                       lambda temporary: table.to_csv(temporary, index=False, float_format="%.6g"))
    pictures = _Pictures(folder)
    worst = list(table.sort_values("loss", ascending=False, kind="stable").index[:top_losses])

    sections = [_top_losses_section(table, worst, pictures),
                _heat_map_section(table, worst[:explained], pictures, models, preprocessings, member_weights,
                                  class_names, folder),
                _pairs_section(table, pairs, pictures, examples_per_breed),
                _confusion_section(counts, class_names, folder, title),
                _accuracy_section(breeds, scores, folder, title),
                _calibration_section(probabilities, labels, run_dir, folder, title)]
    header = [f"<p>{html.escape(source)}</p>"] if source else []
    if scores:
        header.append(f"<p>accuracy <b>{scores['accuracy']:.2%}</b>, top-5 accuracy {scores['top5_accuracy']:.2%}, "
                      f"log loss {scores['log_loss']:.4f}, {len(paths)} images, {len(class_names)} breeds</p>")
    header.append("<p>" + " · ".join(f'<a href="{html.escape(target)}">{html.escape(text)}</a>' for text, target in
                                     [("predictions.csv (every image, its top 5 and loss)", "predictions.csv"),
                                      *links]) + "</p>")
    navigation = "<nav>" + "".join(f'<a href="#{anchor}">{html.escape(name)}</a>'
                                   for anchor, name, _ in sections) + "</nav>"
    body = "\n".join(f'<section id="{anchor}">\n<h2>{html.escape(name)}</h2>\n{content}\n</section>'
                     for anchor, name, content in sections)
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}: evaluation</title>\n<style>{PAGE_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}: what the model gets wrong</h1>\n" + "\n".join(header) + "\n"
            + navigation + "\n" + body + "\n</body>\n</html>\n")
    files.replace_into(folder / "index.html", lambda temporary: temporary.write_text(page))
    return folder / "index.html"


def _top_losses_section(table, worst, pictures):
    figures = [_figure(pictures.thumbnail(index, table.at[index, "path"]), _caption(table.loc[index]),
                       f"{table.at[index, 'true_breed']} photo") for index in worst]
    content = ('<p>The validation photos the model was most wrong about (highest -ln p(true breed)).</p>\n'
               '<div class="gallery">' + "".join(figures) + "</div>")
    return "top-losses", "Top losses", content


def _heat_map_section(table, indices, pictures, models, preprocessings, member_weights, class_names, folder):
    explainers = [gradcam.Explainer(model) for model in models]
    if not any(explainer.has_maps for explainer in explainers):
        return "heat-maps", "Where the model looked", f'<p class="note">{html.escape(gradcam.NO_CONVOLUTION_NOTE)}</p>'
    (folder / "heat_maps").mkdir(exist_ok=True)
    weights = metrics.normalised_weights(member_weights, len(models))
    index_of = {name: position for position, name in enumerate(class_names)}
    photos = [table.at[index, "path"] for index in indices]
    for which, column in (("predicted", "top1_breed"), ("true", "true_breed")):
        classes = [index_of[table.at[index, column]] for index in indices]
        overlays = gradcam.explain_paths(explainers, weights, photos, classes, preprocessings,
                                         size=THUMBNAIL_SIZE) if len(indices) else []
        for index, overlay in zip(indices, overlays):
            overlay.save(folder / f"heat_maps/{index:05d}-{which}.jpg", "JPEG", quality=80)
    blocks = []
    for index in indices:
        row = table.loc[index]
        blocks.append(
            "<div>" + _figure(pictures.thumbnail(index, row["path"]), _caption(row), f"{row['true_breed']} photo")
            + _figure(f"heat_maps/{index:05d}-predicted.jpg",
                      f"why <b>{html.escape(row['top1_breed'])}</b> (predicted)", "heat map of the predicted breed")
            + _figure(f"heat_maps/{index:05d}-true.jpg",
                      f"where <b>{html.escape(row['true_breed'])}</b> (true) is seen", "heat map of the true breed")
            + "</div>")
    layers = ", ".join(dict.fromkeys(f"<code>{html.escape(explainer.layer_name)}</code>"
                                     for explainer in explainers if explainer.has_maps))
    note = (f"Grad-CAM (Selvaraju et al. 2017) on {layers}, over the {preprocessings[0].image_size} px centre crop "
            "the model sees: red is where the evidence for the breed lies. The top-loss photos, each with the map "
            "of the breed predicted and of the true breed.")
    if len(models) > 1:
        note += (f" The ensemble's map is its {len(models)} members' maps averaged with the ensemble's weights "
                 "(a member without convolutions adds nothing).")
    if not all(any(isinstance(layer, keras.layers.GlobalAveragePooling2D) for layer in model.layers)
               for model, explainer in zip(models, explainers) if explainer.has_maps):
        note += (" A network that flattens its last convolution into dense layers (as LeNet-5 does) gives weak "
                 "evidence of where it looks; the ResNets' global average pooling is what Grad-CAM is made for.")
    return "heat-maps", "Where the model looked", f"<p>{note}</p>\n" + '<div class="explained">' + "".join(
        blocks) + "</div>"


def _pairs_section(table, pairs, pictures, count):
    if not len(pairs):
        return "pairs", "Most-confused breeds", "<p>No breed was taken for another.</p>"
    blocks = []
    for pair in pairs.to_dict("records"):
        columns = []
        for breed, other, mistaken in ((pair["breed_a"], pair["breed_b"], pair["a_as_b"]),
                                       (pair["breed_b"], pair["breed_a"], pair["b_as_a"])):
            figures = "".join(_figure(pictures.thumbnail(index, table.at[index, "path"]), _caption(table.loc[index]),
                                      f"{breed} photo") for index in _examples(table, breed, other, count))
            columns.append(f"<div><div><h3>{html.escape(breed)}</h3>{mistaken} taken for {html.escape(other)}</div>"
                           f"{figures}</div>")
        blocks.append(f'<h3>{html.escape(pair["breed_a"])} / {html.escape(pair["breed_b"])}: {pair["total"]} '
                      f'confusions</h3>\n<div class="pair">' + "".join(columns) + "</div>")
    intro = ("<p>Each pair with photos of both breeds side by side: first those taken for the other breed, "
             "then the hardest of the rest.</p>")
    return "pairs", "Most-confused breeds", intro + "\n".join(blocks)


def _confusion_section(counts, class_names, folder, title):
    plots.plot_confusion_heat_map(counts, class_names, confusion_order(counts), folder / "confusion_matrix.png",
                                  title=f"{title}: confusion matrix")
    return "confusion", "Confusion matrix", (
        "<p>Rows: true breed; columns: predicted; each cell the share of the row's images (square-root colour "
        "scale). Breeds are ordered so that those confused with each other sit together (average-linkage "
        "clustering of the symmetrised confusion rates): blocks off the diagonal are groups of look-alikes.</p>"
        '<figure><img src="confusion_matrix.png" alt="confusion matrix heat map"></figure>')


def _accuracy_section(breeds, scores, folder, title):
    plots.plot_breed_accuracy(breeds, folder / "breed_accuracy.png",
                              overall=scores["accuracy"] if scores else None, title=f"{title}: accuracy per breed")
    return "breeds", "Accuracy per breed", (
        '<figure><img src="breed_accuracy.png" alt="accuracy per breed, worst first"></figure>')


def _calibration_section(probabilities, labels, run_dir, folder, title):
    summary_path = pathlib.Path(run_dir) / "metrics.json" if run_dir else None
    calibrated = None
    if summary_path and summary_path.is_file():
        calibrated = json.loads(summary_path.read_text()).get("val_calibrated")
    ensemble = bool(run_dir) and (pathlib.Path(run_dir) / "ensemble.json").is_file()
    label = ("the ensemble's probabilities (each member's own temperature)" if ensemble
             else f"these probabilities (temperature {calibrated['temperature']:.3f})" if calibrated
             else "these probabilities (not calibrated)")
    plots.plot_reliability({label: metrics.reliability(probabilities, labels)}, folder / "reliability.png",
                           title=f"{title}: reliability")
    content = ["<p>Accuracy against confidence in 15 bins: a calibrated model's points lie on the diagonal.</p>",
               '<figure><img src="reliability.png" alt="reliability diagram of the evaluated probabilities">'
               "<figcaption>The probabilities evaluated here.</figcaption></figure>"]
    run_figure = pathlib.Path(run_dir) / "calibration.png" if run_dir else None
    if run_figure and run_figure.is_file():
        shutil.copyfile(run_figure, folder / "calibration.png")
        content.append('<figure><img src="calibration.png" alt="calibration at training time">'
                       "<figcaption>At the end of training: raw against temperature-scaled probabilities on the "
                       "validation split the temperature was fitted on.</figcaption></figure>")
    if ensemble:
        content.append('<p class="note">An ensemble averages its members\' probabilities, each already scaled by '
                       "the temperature its run fitted; it has no temperature of its own.</p>")
    elif not calibrated:
        content.append('<p class="note">This run was trained with --no-calibrate: its probabilities are the raw '
                       "softmax, no temperature was fitted.</p>")
    return "calibration", "Calibration", "\n".join(content)
