"""Served pixels are trained pixels: the files the data check converts are predicted from its copy, or refused.

The data check (`tfdogs.data.validation.check_data`) trains on a Pillow RGB
copy of every file TensorFlow decodes otherwise than Pillow. Here each such
file is made by Pillow in the test, and the reference is Pillow's own upright
RGB decoding of it, fed to the model as pixels (`serving_images`).
"""

import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from tfdogs import data
from tfdogs.data import validation
from tfdogs.runs.folder import load_run
from tfdogs.runs.predictor import load_predictor, predict_files
from tfdogs.runs.submission import write_submission

REFUSED_MESSAGE = "convert it to an RGB JPEG or PNG first"


def encoded(image, format, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def orientation_exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.fixture(scope="module")
def photo(dogs10_dir):
    """A real dog photo, 160 px wide."""
    path = sorted((dogs10_dir / "beagle").glob("*.jpg"))[0]
    with Image.open(path) as image:
        return image.convert("RGB").resize((160, round(160 * image.height / image.width)))


def converted_kinds(photo):
    """{name: (bytes, suffix)} of files the data check converts, each made by Pillow."""
    cmyk = Image.merge("CMYK", [*photo.convert("CMYK").split()[:3], photo.convert("L")])  # black ink too
    return {
        "palette BMP": (encoded(photo.convert("P", palette=Image.Palette.ADAPTIVE), "BMP"), ".bmp"),
        "1-bit BMP": (encoded(photo.convert("1"), "BMP"), ".bmp"),
        "CMYK JPEG": (encoded(cmyk, "JPEG", quality=95), ".jpg"),
        "TIFF": (encoded(photo, "TIFF"), ".tif"),
        "PNG stored sideways": (encoded(photo, "PNG", exif=orientation_exif(6)), ".png"),
        "WebP stored sideways": (encoded(photo, "WEBP", lossless=True, exif=orientation_exif(8)), ".webp"),
        "over 4096 px": (encoded(photo.resize((4100, 40)), "PNG"), ".png"),
    }


def kept_kinds(photo):
    """{name: bytes} of lossless files the data check keeps, which TensorFlow decodes as Pillow."""
    return {
        "grey BMP": encoded(photo.convert("L"), "BMP"),
        "RGB BMP": encoded(photo, "BMP"),
        "palette PNG": encoded(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "PNG with orientation 1": encoded(photo, "PNG", exif=orientation_exif(1)),
        "GIF": encoded(photo.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        "WebP": encoded(photo, "WEBP", lossless=True),
    }


def pillow_rgb(image_bytes, max_side=4096):
    """Pillow's reading, upright and RGB; over max_side, what training reads of the check's copy.

    That copy is shrunk by Pillow (LANCZOS) and stored as JPEG quality 95,
    which training decodes with TensorFlow.
    """
    with Image.open(io.BytesIO(image_bytes)) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    if max(rgb.size) <= max_side:
        return np.asarray(rgb)
    scale = max_side / max(rgb.size)
    rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.LANCZOS)
    return tf.io.decode_jpeg(encoded(rgb, "JPEG", quality=95), channels=3).numpy()


@pytest.fixture(scope="module")
def export(lenet_run):
    version_dir = json.loads((lenet_run / "metrics.json").read_text())["export"]
    return tf.saved_model.load(version_dir).signatures


def served_pixels(signatures, pixels):
    return signatures["serving_images"](images=tf.constant(pixels[None].astype(np.float32)))["probabilities"].numpy()[0]


def test_tensorflow_decodes_each_converted_kind_otherwise_than_pillow(photo):
    """The premise: read raw, these files give other pixels (or none); the kept kinds give Pillow's."""
    for name, (image_bytes, _) in converted_kinds(photo).items():
        try:
            decoded = data.decode_image(image_bytes).numpy().astype(int)
        except tf.errors.InvalidArgumentError:
            continue
        if name == "over 4096 px":  # decoded alike, but training reads the check's shrunk copy
            continue
        reference = pillow_rgb(image_bytes, max_side=1 << 20).astype(int)
        # a CMYK JPEG differs least: up to 10 levels on this photo, TensorFlow's CMYK conversion and IDCT
        assert decoded.shape != reference.shape or np.abs(decoded - reference).max() >= 5, name
    for name, image_bytes in kept_kinds(photo).items():
        np.testing.assert_array_equal(data.decode_image(image_bytes).numpy(), pillow_rgb(image_bytes), err_msg=name)


def test_the_saved_model_refuses_what_the_data_check_converts_and_names_it(photo, export):
    names = {"palette BMP": "palette BMP", "1-bit BMP": "palette BMP", "CMYK JPEG": "CMYK JPEG", "TIFF": "TIFF",
             "PNG stored sideways": "PNG with an EXIF orientation",
             "WebP stored sideways": "WebP with an EXIF orientation", "over 4096 px": "4100x40 px"}
    for name, (image_bytes, _) in converted_kinds(photo).items():
        with pytest.raises(tf.errors.InvalidArgumentError) as refused:
            export["serving_default"](image_bytes=tf.constant([image_bytes]))
        assert names[name] in refused.value.message and REFUSED_MESSAGE in refused.value.message, name


def test_the_saved_model_serves_the_kept_kinds_as_pillow_reads_them(photo, export):
    for name, image_bytes in kept_kinds(photo).items():
        served = export["serving_default"](image_bytes=tf.constant([image_bytes]))["probabilities"].numpy()[0]
        np.testing.assert_allclose(served, served_pixels(export, pillow_rgb(image_bytes)), atol=1e-6, err_msg=name)


@pytest.mark.parametrize("model", ["run", "saved model"])
def test_predict_answers_each_converted_kind_from_pillows_pixels(photo, export, lenet_run, tmp_path, model):
    kinds = converted_kinds(photo)
    paths = []
    for index, (image_bytes, suffix) in enumerate(kinds.values()):
        paths.append(tmp_path / f"photo{index}{suffix}")
        paths[-1].write_bytes(image_bytes)
    source = lenet_run if model == "run" else json.loads((lenet_run / "metrics.json").read_text())["export"]
    outputs = predict_files(load_predictor(source), paths, verbose=0)
    assert outputs["errors"] == [None] * len(paths)
    for name, (image_bytes, _), answer in zip(kinds, kinds.values(), outputs["probabilities"]):
        np.testing.assert_allclose(answer, served_pixels(export, pillow_rgb(image_bytes)), atol=1e-6, err_msg=name)


def test_predict_on_a_palette_bmp_answers_as_evaluate_on_the_checks_copy(photo, lenet_run, tmp_path):
    folder = tmp_path / "photos" / "beagle"
    folder.mkdir(parents=True)
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.bmp")
    photo.save(folder / "plain.png")
    (tmp_path / "photos" / "other").mkdir()
    photo.save(tmp_path / "photos" / "other" / "plain.png")
    report = validation.check_data(tmp_path / "photos", converted_dir=tmp_path / "converted", verbose=0)
    copy = report.sources[report.records.paths.index(str(folder / "palette.bmp"))]
    assert copy.startswith(str(tmp_path / "converted"))

    run = load_run(lenet_run)
    evaluation = data.make_dataset([copy], [0], batch_size=1, training=False, **run.preprocessing.as_dict())
    images, _ = next(iter(evaluation))
    evaluated = tf.nn.softmax(run.load_model()(images, training=False)).numpy()[0]
    predicted = predict_files(load_predictor(lenet_run), [folder / "palette.bmp"], verbose=0)["probabilities"][0]
    np.testing.assert_allclose(predicted, evaluated, atol=1e-5)


def test_submit_answers_a_converted_test_photo_from_pillows_pixels(photo, export, lenet_run, tmp_path):
    class_names = load_run(lenet_run).class_names
    (tmp_path / "test").mkdir()
    (tmp_path / "sample_submission.csv").write_text(
        "id," + ",".join(class_names) + "\n" + "".join(f"{name},{'0,' * (len(class_names) - 1)}0\n"
                                                       for name in ("cmyk", "sideways")))
    kinds = converted_kinds(photo)
    (tmp_path / "test" / "cmyk.jpg").write_bytes(kinds["CMYK JPEG"][0])
    (tmp_path / "test" / "sideways.jpg").write_bytes(kinds["PNG stored sideways"][0])  # a PNG named .jpg
    table = write_submission(lenet_run, tmp_path, tmp_path / "submission.csv", verbose=0)
    for row, kind in enumerate(("CMYK JPEG", "PNG stored sideways")):
        expected = served_pixels(export, pillow_rgb(kinds[kind][0]))
        np.testing.assert_allclose(table[class_names].to_numpy()[row], expected / expected.sum(), atol=1e-6,
                                   err_msg=kind)
