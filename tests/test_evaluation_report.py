"""The evaluation report: its files, the page in headless Chromium, the confusion ordering, Grad-CAM."""

import html.parser
import json
import os
import pathlib
import shutil
import subprocess

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_compare import doctored_copy

from tfdogs import data, models, predict
from tfdogs.evaluation import gradcam, metrics, report as evaluation_report
from tfdogs.runs import comparison, evaluation as run_evaluation


@pytest.fixture(scope="module")
def evaluated(lenet_run, tmp_path_factory):
    """`evaluate` of the session's LeNet-5 run, into its own folder."""
    return run_evaluation.evaluate(lenet_run, output=tmp_path_factory.mktemp("evaluation") / "evaluation")


class _References(html.parser.HTMLParser):
    """Every src and href of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.links = [], []

    def handle_starttag(self, tag, attributes):
        attributes = dict(attributes)
        if tag == "img":
            self.images.append(attributes["src"])
        if tag == "a":
            self.links.append(attributes["href"])


def test_report_holds_predictions_pictures_and_resolving_links(evaluated):
    folder = pathlib.Path(evaluated["output"]) / "report"
    table = pd.read_csv(folder / "predictions.csv")
    assert len(table) == evaluated["num_images"]
    assert list(table.columns[:5]) == ["path", "true_breed", "true_probability", "loss", "correct"]
    assert {f"top{rank}_breed" for rank in range(1, 5)} <= set(table.columns)  # 4 breeds: a top 4
    assert table["loss"].mean() == pytest.approx(evaluated["scores"]["log_loss"], rel=1e-4)
    assert table["correct"].mean() == pytest.approx(evaluated["scores"]["accuracy"])

    references = _References()
    page = (folder / "index.html").read_text()
    references.feed(page)
    for target in references.images + [link for link in references.links if not link.startswith("#")]:
        assert not pathlib.PurePath(target).is_absolute() and (folder / target).is_file(), target
    assert "predictions.csv" in references.links
    for image in ("confusion_matrix.png", "breed_accuracy.png", "reliability.png", "calibration.png"):
        assert image in references.images
    thumbnails = [image for image in references.images if image.startswith("thumbnails/")]
    heat_maps = [image for image in references.images if image.startswith("heat_maps/")]
    assert len(set(thumbnails)) >= min(24, evaluated["num_images"]) and len(heat_maps) == 2 * min(
        12, evaluated["num_images"])
    for image in thumbnails + heat_maps:
        with Image.open(folder / image) as opened:
            assert opened.format == "JPEG" and max(opened.size) <= evaluation_report.THUMBNAIL_SIZE
    for heading in ("Top losses", "Where the model looked", "Most-confused breeds", "Confusion matrix",
                    "Accuracy per breed", "Calibration"):
        assert f"<h2>{heading}</h2>" in page
    assert "<code>conv2</code>" in page  # LeNet-5's last convolution
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    print(f"report of {evaluated['num_images']} images, 4 breeds: {size / 1e3:.0f} kB")
    assert size < 2_000_000


# A check run inside the page: records load errors and console.error, then every image's natural width.
BROWSER_CHECK = """<script>
window.checkErrors = [];
window.addEventListener('error', function (event) {
  var target = event.target;
  checkErrors.push(event.message || ('failed to load ' + (target && (target.src || target.href))));
}, true);
var originalError = console.error;
console.error = function () {
  checkErrors.push(Array.prototype.join.call(arguments, ' '));
  originalError.apply(console, arguments);
};
window.addEventListener('load', function () {
  var images = Array.prototype.map.call(document.images, function (image) {
    return {src: image.getAttribute('src'), width: image.naturalWidth};
  });
  var out = document.createElement('pre');
  out.id = 'browser-check';
  out.textContent = JSON.stringify({images: images, errors: checkErrors});
  document.body.appendChild(out);
});
</script>"""


def chromium():
    """The Chromium binary; missing, the test fails in CI (CI=true) and is skipped, saying why, elsewhere."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    message = "Chromium is missing: install Debian's package (apt-get install -y chromium); .ci/run does."
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def run_chromium(binary, *arguments):
    command = [binary, "--headless", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
               "--virtual-time-budget=10000", *arguments]
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses root with its sandbox on (CI runs as root)
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    binary = chromium()
    folder = pathlib.Path(evaluated["output"]) / "report"
    # The checked copy sits beside index.html, so its relative paths are the page's.
    checked = folder / "_browser_check.html"
    checked.write_text((folder / "index.html").read_text().replace("<head>", "<head>\n" + BROWSER_CHECK, 1))
    try:
        dom = run_chromium(binary, "--dump-dom", checked.as_uri())
    finally:
        checked.unlink()
    start = dom.index('<pre id="browser-check">') + len('<pre id="browser-check">')
    result = json.loads(html.unescape(dom[start:dom.index("</pre>", start)]))
    assert len(result["images"]) >= 30
    assert [image["src"] for image in result["images"] if image["width"] == 0] == []
    assert result["errors"] == []

    screenshot = tmp_path / "report.png"
    run_chromium(binary, f"--screenshot={screenshot}", "--window-size=1280,2400", (folder / "index.html").as_uri())
    with Image.open(screenshot) as image:
        assert image.size == (1280, 2400)
        assert np.asarray(image.convert("L")).std() > 10  # something drawn, not a blank page
    print(f"screenshot: {screenshot}")


def test_confusion_order_puts_confused_breeds_together():
    # Three groups of look-alikes (0-3, 4-6, 7-8) and three breeds never confused, shuffled.
    counts = np.diag(np.full(12, 20))
    for group in ((0, 1, 2, 3), (4, 5, 6), (7, 8)):
        for a in group:
            for b in group:
                if a != b:
                    counts[a, b] = 3
    permutation = np.random.default_rng(0).permutation(12)
    shuffled = counts[np.ix_(permutation, permutation)]
    order = evaluation_report.confusion_order(shuffled)
    assert sorted(order) == list(range(12))
    positions = {int(permutation[index]): position for position, index in enumerate(order)}
    for group in ((0, 1, 2, 3), (4, 5, 6), (7, 8)):
        places = sorted(positions[breed] for breed in group)
        assert places[-1] - places[0] == len(group) - 1, (group, places)  # contiguous
    assert sorted(positions[breed] for breed in (9, 10, 11)) == [9, 10, 11]  # the unconfused last


def test_gradcam_explains_the_last_stage_where_its_cells_look():
    resnet = models.build("resnet18", 3, input_shape=(64, 64, 3))
    assert gradcam.target_layer_name(resnet) == "layer4.1.relu2"
    # torch-style symmetric padding: cell 0 is centred on pixel 0, cells 32 px apart
    assert gradcam.cell_geometry(resnet, "layer4.1.relu2") == (0.5, 32.0)
    lenet = models.build("lenet5", 3, input_shape=(32, 32, 3))
    assert gradcam.target_layer_name(lenet) == "conv2"
    # unpadded 5x5, 2x2 pool, 5x5: cell 0 sees pixels 0-13, centred at 7; 10 cells 2 px apart
    assert gradcam.cell_geometry(lenet, "conv2") == (7.0, 2.0)
    maps = gradcam.Explainer(lenet).heat_maps(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), [0, 2])
    assert maps.shape == (2, 32, 32) and maps.min() >= 0 and maps.max() <= 1

    dense = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(3)])
    assert not gradcam.Explainer(dense).has_maps


def test_gradcam_puts_its_mass_on_the_shape_not_the_background():
    """Trained on the synthetic shapes (one per class, on grey noise), the map should cover the shape.

    A small convolutional network with global average pooling (the ResNets'
    head) is trained in memory, where the shape's mask is known exactly: the
    background is grey (R = G = B), the shape saturated. Measured (CPU, seed 0):
    mean 0.59 of the map's mass on shapes covering 0.18 of the image.
    """
    size, classes = 32, 6
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), 50)
    pixels = np.stack([data.synthetic_image(rng, label, classes, size) for label in labels])
    masks = (pixels.max(axis=-1).astype(int) - pixels.min(axis=-1)) > 40
    images = ((pixels / 255 - 0.45) / 0.225).astype(np.float32)
    order = rng.permutation(len(labels))
    train, test = order[:240], order[240:]
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(classes)(x))
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images[train], labels[train], epochs=20, batch_size=16, verbose=0)
    logits = model.predict(images[test], verbose=0)
    assert metrics.top_k_accuracy(logits, labels[test], 1) >= 0.9

    maps = gradcam.Explainer(model).heat_maps(images[test], labels[test])
    assert gradcam.Explainer(model).layer_name == "last_conv"
    mass_on_shape = (maps * masks[test]).sum(axis=(1, 2)) / np.maximum(maps.sum(axis=(1, 2)), 1e-12)
    area_share = masks[test].mean(axis=(1, 2))
    print(f"Grad-CAM mass on the shape: mean {mass_on_shape.mean():.3f}, median {np.median(mass_on_shape):.3f}, "
          f"min {mass_on_shape.min():.3f}; shape area share: mean {area_share.mean():.3f}")
    assert mass_on_shape.mean() >= 0.5  # most of the mass, on under a fifth of the pixels
    assert np.mean(mass_on_shape > 2 * area_share) >= 0.8


def test_predict_explain_writes_one_overlay_per_answered_image(lenet_run, tmp_path, capsys):
    photos = sorted((lenet_run / "synthetic_data" / "train").glob("*.jpg"))[:2]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo")
    explain = tmp_path / "why"
    assert predict.main([str(lenet_run), *map(str, photos), str(broken), "--json", "--explain", str(explain)]) == 1
    results = json.loads(capsys.readouterr().out)
    for photo, result in zip(photos, results):
        overlay = pathlib.Path(result["explanation"])
        assert overlay.parent == explain and photo.stem in overlay.name and overlay.suffix == ".png"
        with Image.open(overlay) as image:
            assert image.format == "PNG" and image.size == (224, 224)
    assert "explanation" not in results[2] and "error" in results[2]
    assert sorted(path.name for path in explain.iterdir()) == sorted(
        pathlib.Path(result["explanation"]).name for result in results[:2])


def test_compare_links_each_runs_evaluation_report(lenet_run, evaluated, tmp_path):
    with_report = doctored_copy(lenet_run, tmp_path / "evaluated-run")
    shutil.copytree(pathlib.Path(evaluated["output"]) / "report", with_report / "evaluation" / "report")
    without = doctored_copy(lenet_run, tmp_path / "plain-run")
    comparison.compare([with_report, without], tmp_path / "comparison")
    references = _References()
    references.feed((tmp_path / "comparison" / "index.html").read_text())
    reports = [link for link in references.links if link.endswith("index.html")]
    assert reports == ["../evaluated-run/evaluation/report/index.html"]
    assert (tmp_path / "comparison" / reports[0]).resolve().is_file()
    assert without.name not in " ".join(references.links)
