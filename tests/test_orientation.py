"""EXIF orientation: phone photos stored sideways are read upright everywhere, as Pillow shows them.

Pixels are compared on what one decoder (TensorFlow's) gives: TensorFlow's and
Pillow's JPEG decoders differ by a few levels, the orientation must not.
"""

import csv
import io
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from tfdogs import data
from tfdogs.data import validation

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ORIENTATIONS = range(1, 9)


def exif_segment(orientation, byte_order="II"):
    """A JPEG APP1 Exif segment whose IFD0 holds Make, then Orientation, in the given TIFF byte order."""
    endian = "<" if byte_order == "II" else ">"
    entries = [(0x010F, 2, 4, b"Cam\0"), (0x0112, 3, 1, struct.pack(endian + "H", orientation) + b"\0\0")]
    tiff = byte_order.encode() + struct.pack(endian + "HI", 42, 8) + struct.pack(endian + "H", len(entries))
    tiff += b"".join(struct.pack(endian + "HHI", tag, kind, count) + value for tag, kind, count, value in entries)
    payload = b"Exif\0\0" + tiff + struct.pack(endian + "I", 0)
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def oriented(jpeg, orientation, byte_order="II"):
    """The same JPEG (same compressed pixels) with an XMP APP1 and then an Exif APP1 inserted after its JFIF APP0."""
    assert jpeg[:4] == b"\xff\xd8\xff\xe0"
    after_app0 = 4 + struct.unpack(">H", jpeg[4:6])[0]
    xmp = b"http://ns.adobe.com/xap/1.0/\0<x/>"
    xmp_segment = b"\xff\xe1" + struct.pack(">H", len(xmp) + 2) + xmp
    return jpeg[:after_app0] + xmp_segment + exif_segment(orientation, byte_order) + jpeg[after_app0:]


def upright_reference(jpeg, orientation):
    """TensorFlow's decoded stored pixels, turned by Pillow's `ImageOps.exif_transpose`."""
    stored = Image.fromarray(tf.io.decode_jpeg(jpeg, channels=3).numpy())
    stored.getexif()[0x0112] = orientation
    return np.asarray(ImageOps.exif_transpose(stored))


@pytest.fixture(scope="module")
def photo(dogs10_dir):
    """A real, landscape dog photo without EXIF orientation."""
    path = sorted((dogs10_dir / "beagle").glob("*.jpg"))[0]
    jpeg = path.read_bytes()
    assert Image.open(io.BytesIO(jpeg)).getexif().get(0x0112) is None
    return jpeg


@pytest.mark.parametrize("byte_order", ["II", "MM"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_decode_image_turns_each_orientation_upright_as_pillow_does(photo, orientation, byte_order):
    image_bytes = oriented(photo, orientation, byte_order)
    pillow = Image.open(io.BytesIO(image_bytes))
    assert pillow.getexif()[0x0112] == orientation  # the test file is what Pillow reads as such
    expected = upright_reference(photo, orientation)
    assert expected.shape[:2] == ImageOps.exif_transpose(pillow).size[::-1]

    eager = data.decode_image(tf.constant(image_bytes))
    mapped = next(iter(tf.data.Dataset.from_tensors(image_bytes).map(data.decode_image)))
    assert int(data.exif_orientation(image_bytes)) == orientation
    np.testing.assert_array_equal(eager.numpy(), expected)
    np.testing.assert_array_equal(mapped.numpy(), expected)


@pytest.mark.parametrize("image_bytes", [
    b"", b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe1\x00\x08Exif\x00\x00",  # cut short
    b"\xff\xd8" + exif_segment(9),  # out of range
    b"\xff\xd8" + exif_segment(6)[:-20],  # IFD cut off
    b"\xff\xd8" + exif_segment(6).replace(b"II*\0\x08", b"II*\0\xff"),  # IFD0 offset past the end
    b"\xff\xd8\xff\xda" + exif_segment(6),  # after the start of scan
])
def test_missing_or_malformed_exif_means_as_stored(image_bytes):
    assert int(data.exif_orientation(image_bytes)) == 1
    assert int(next(iter(tf.data.Dataset.from_tensors(image_bytes).map(data.exif_orientation)))) == 1


def reference_orientation(image_bytes):
    """The reader's rules in plain Python (`data.exif_orientation`): the orientation, or 1."""
    def number(at, width, order):
        chunk = image_bytes[at:at + width] if at >= 0 else b""
        return int.from_bytes(chunk.ljust(width, b"\0"), order)

    segment = image_bytes[:1 << 16].find(b"Exif\0\0") - 4
    if (segment < 2 or segment + 4 >= min(len(image_bytes), 1 << 16)
            or image_bytes[:2] != b"\xff\xd8" or image_bytes[segment:segment + 2] != b"\xff\xe1"):
        return 1
    position, opens_file = 2, False
    for _ in range(4):  # the segments that open the file: FF, APPn or COM, a big-endian length
        if position < 0 or image_bytes[position:position + 1] != b"\xff" or not (
                0xE0 <= number(position + 1, 1, "big") <= 0xEF or number(position + 1, 1, "big") == 0xFE):
            position = -1
            continue
        opens_file = opens_file or position == segment
        position += 2 + number(position + 2, 2, "big")
    tiff = segment + 10
    order = {b"II": "little", b"MM": "big"}.get(image_bytes[tiff:tiff + 2])
    if not opens_file or order is None or number(tiff + 2, 2, order) != 42:
        return 1
    directory = tiff + number(tiff + 4, 4, order)
    for entry in range(min(number(directory, 2, order), 32)):
        at = directory + 2 + 12 * entry
        if number(at, 2, order) == 0x0112 and number(at + 2, 2, order) == 3 and 1 <= number(at + 8, 2, order) <= 8:
            return number(at + 8, 2, order)
    return 1


def test_the_exif_reader_follows_its_rules_on_thousands_of_damaged_headers(photo):
    """Bytes changed, cut out, inserted and files cut short in real Exif headers, against the rules in Python."""
    def comment(size):
        return b"\xff\xfe" + struct.pack(">H", size + 2) + b"c" * size

    starts = [oriented(photo, 6)[:300], oriented(photo, 3, "MM")[:300], b"\xff\xd8" + exif_segment(8, "MM"),
              b"\xff\xd8" + comment(40) + exif_segment(5), b"\xff\xd8" + comment(9) * 3 + exif_segment(7)]
    cases = [b"\xff\xd8" + comment(size) + exif_segment(6, "MM") + photo[2:] for size in (65000, 65480, 65533)]
    cases += [b"\xff\xd8" + comment(9) * 4 + exif_segment(2)]  # the fifth segment: not read
    generator = np.random.default_rng(0)
    for _ in range(3000):
        damaged = bytearray(starts[generator.integers(len(starts))])
        for _ in range(generator.integers(1, 5)):
            at, kind = int(generator.integers(len(damaged) + 1)), generator.random()
            if kind < 0.5:
                damaged[at:at + 1] = bytes([generator.integers(256)])
            elif kind < 0.7:
                del damaged[at:at + int(generator.integers(1, 9))]
            elif kind < 0.85:
                damaged[at:at] = generator.integers(256, size=int(generator.integers(1, 9)), dtype=np.uint8).tobytes()
            else:
                del damaged[at:]
        cases.append(bytes(damaged))
    read = [int(value) for value in tf.data.Dataset.from_tensor_slices(cases).map(data.exif_orientation)]
    expected = [reference_orientation(case) for case in cases]
    assert sum(value != 1 for value in expected) > 600  # many still carry an orientation
    assert read == expected


def write_upright_png(jpeg, orientation, path):
    Image.fromarray(upright_reference(jpeg, orientation)).save(path)


def test_the_exif_reader_is_traced_once_however_many_graphs_call_it():
    def pipelines():  # two pipelines, each tracing its own map function that calls the reader
        list(tf.data.Dataset.from_tensors(tf.constant(b"not an image")).map(data.exif_orientation))
        list(tf.data.Dataset.from_tensors(tf.constant(b"\xff\xd8")).map(
            lambda image_bytes: data.exif_orientation(image_bytes) + 0))

    pipelines()
    traced = data.exif_orientation.experimental_get_tracing_count()  # other tests may have traced it already
    pipelines()
    pipelines()
    assert data.exif_orientation.experimental_get_tracing_count() == traced


def test_the_exif_reader_stays_a_small_graph():
    """tf.data optimises every map function's graph again for each iterator; the reader's 628 nodes cost 0.08 s."""
    graph = data.exif_orientation.get_concrete_function().graph.as_graph_def()
    assert len(graph.node) + sum(len(function.node_def) for function in graph.library.function) <= 300


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_the_evaluation_pipeline_reads_oriented_jpegs_upright(photo, tmp_path, orientation):
    sideways, upright = tmp_path / "sideways.jpg", tmp_path / "upright.png"
    sideways.write_bytes(oriented(photo, orientation))
    write_upright_png(photo, orientation, upright)
    pair = [str(sideways), str(upright)]

    def batch(**options):
        dataset = data.make_dataset(pair, [0, 1], image_size=48, batch_size=2, mean=MEAN, std=STD, **options)
        return next(iter(dataset))[0].numpy()

    evaluation = batch(training=False)
    np.testing.assert_array_equal(evaluation[0], evaluation[1])


def test_training_crops_of_an_oriented_jpeg_are_crops_of_the_upright_photo(photo):
    seed = tf.constant([3, 4], tf.int64)
    for orientation in (2, 6, 7):
        sideways = oriented(photo, orientation)
        crop = data.random_crop_bytes(tf.constant(sideways), seed, (0.3, 0.6)).numpy()
        upright = upright_reference(photo, orientation)
        window_crop = data.random_crop_image(tf.constant(upright), seed, (0.3, 0.6)).numpy()
        np.testing.assert_array_equal(crop, window_crop)


def problems_of(report_path):
    with open(report_path, newline="") as file:
        return {row["file"]: row for row in csv.DictReader(file)}


def test_the_data_check_notes_oriented_jpegs_and_converts_other_formats_upright(photo, tmp_path):
    root = tmp_path / "photos"
    for breed in ("beagle", "pug"):
        (root / breed).mkdir(parents=True)
        (root / breed / "plain.jpg").write_bytes(photo)
    (root / "beagle" / "phone.jpg").write_bytes(oriented(photo, 6))
    png = Image.fromarray(tf.io.decode_jpeg(photo, channels=3).numpy())
    exif = Image.Exif()
    exif[0x0112] = 8
    png.save(root / "pug" / "phone.png", exif=exif.tobytes())
    converted_dir = tmp_path / "converted"
    report = validation.check_data(root, converted_dir=converted_dir)
    report.write_csv(tmp_path / "problems.csv")
    problems = problems_of(tmp_path / "problems.csv")

    assert problems["beagle/phone.jpg"]["kind"] == "exif-orientation"
    assert problems["beagle/phone.jpg"]["action"] == "kept"
    assert "EXIF orientation 6" in problems["beagle/phone.jpg"]["reason"]
    assert "upright" in problems["beagle/phone.jpg"]["reason"]
    assert problems["pug/phone.png"]["kind"] == "exif-orientation"
    assert problems["pug/phone.png"]["action"] == "converted"
    copy = report.sources[report.records.paths.index(str(root / "pug" / "phone.png"))]
    np.testing.assert_array_equal(np.asarray(Image.open(copy)), np.asarray(ImageOps.exif_transpose(
        Image.open(root / "pug" / "phone.png")).convert("RGB")))


# A server's process: TensorFlow alone, the export's two signatures.
SERVE_IN_TENSORFLOW_ONLY = """
import json, sys
import numpy as np
import tensorflow as tf
signatures = tf.saved_model.load(sys.argv[1]).signatures
references = np.load(sys.argv[2])
answers = []
for index in range(8):
    sideways = open(f"{sys.argv[3]}/{index + 1}.jpg", "rb").read()
    from_bytes = signatures["serving_default"](image_bytes=tf.constant([sideways]))["probabilities"].numpy()
    upright = tf.constant(references[f"upright{index + 1}"][None].astype("float32"))
    from_pixels = signatures["serving_images"](images=upright)["probabilities"].numpy()
    stored = tf.constant(references["stored"][None].astype("float32"))
    as_stored = signatures["serving_images"](images=stored)["probabilities"].numpy()
    answers.append({"bytes": from_bytes[0].tolist(), "upright": from_pixels[0].tolist(),
                    "as_stored": as_stored[0].tolist()})
print(json.dumps({"answers": answers, "tfdogs_loaded": "tfdogs" in sys.modules}))
"""


def test_a_tensorflow_only_server_answers_phone_photos_as_if_upright(lenet_run, photo, tmp_path):
    version_dir = json.loads((lenet_run / "metrics.json").read_text())["export"]
    references = {"stored": tf.io.decode_jpeg(photo, channels=3).numpy()}
    for orientation in ORIENTATIONS:
        (tmp_path / f"{orientation}.jpg").write_bytes(oriented(photo, orientation, "MM" if orientation % 2 else "II"))
        references[f"upright{orientation}"] = upright_reference(photo, orientation)
    np.savez(tmp_path / "references.npz", **references)
    result = subprocess.run([sys.executable, "-c", SERVE_IN_TENSORFLOW_ONLY, version_dir,
                             str(tmp_path / "references.npz"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300, check=True)
    served = json.loads(result.stdout.splitlines()[-1])
    assert not served["tfdogs_loaded"]
    for orientation, answer in zip(ORIENTATIONS, served["answers"]):
        np.testing.assert_allclose(answer["bytes"], answer["upright"], atol=1e-6, err_msg=f"orientation {orientation}")
    # The orientation matters to the model: read as stored, a sideways photo gets other probabilities (compared
    # as logarithms: the calibrated LeNet on its easy shapes is so sure that the top probability barely moves).
    def log_probabilities(values):
        return np.log(np.clip(values, 1e-30, 1.0))

    assert np.abs(log_probabilities(served["answers"][5]["bytes"])
                  - log_probabilities(served["answers"][5]["as_stored"])).max() > 0.01
