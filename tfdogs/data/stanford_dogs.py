"""Stanford Dogs through TensorFlow Datasets, written out as class folders."""

import json
import pathlib
import socket

from tfdogs import progress
from tfdogs.data.layouts import DataError, breed_name, is_image, subdirectories

# Host of the tfds stanford_dogs download URLs (http://vision.stanford.edu/aditya86/ImageNetDogs/*.tar).
STANFORD_DOGS_HOST = ("vision.stanford.edu", 80)
_EXPORT_MARKER = ".tfdogs_export_complete"


def load_stanford_dogs(data_root=None, timeout=5.0) -> pathlib.Path:
    """Stanford Dogs (120 breeds, tfds train split) as a class-folder tree.

    tensorflow_datasets downloads and prepares "stanford_dogs" under
    `data_root`; the train split is then exported once, as the original JPEG
    bytes, to `<data_root>/tfdogs_stanford_dogs/<breed>/<name>.jpg` with Kaggle
    breed names (`chihuahua`). A complete export is returned without touching
    the network.

    Args:
        data_root: tfds data directory; default ~/tensorflow_datasets.
        timeout: Seconds to wait for the download host before giving up.

    Returns:
        The class-folder directory, ready for `find_records`.

    Raises:
        DataError: The data must be downloaded and the host cannot be reached.
    """
    import tensorflow_datasets as tfds  # Heavy import, needed only here.

    data_root = pathlib.Path(data_root or pathlib.Path.home() / "tensorflow_datasets").expanduser()
    folder = data_root / "tfdogs_stanford_dogs"
    if _export_is_complete(folder):
        return folder
    builder = tfds.builder("stanford_dogs", data_dir=str(data_root))
    if not builder.is_prepared():
        _require_host(STANFORD_DOGS_HOST, timeout)
        builder.download_and_prepare()
    examples = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    export_to_class_folders(tfds.as_numpy(examples), builder.info.features["label"].names, folder,
                            total=builder.info.splits["train"].num_examples)
    return folder


def export_to_class_folders(examples, label_names, folder, total=None, verbose=1) -> int:
    """Writes tfds-style examples to `folder/<breed>/<file name>` and marks the export complete.

    Args:
        examples: Iterable of dicts with "image" (encoded bytes, written as
            they are), "image/filename" (str or bytes; its last part names the
            file) and "label" (index into `label_names`).
        label_names: Class names; WordNet ids are stripped as in `find_records`.
        folder: Output directory.
        total: How many examples there are, for the progress bar (none without it).
        verbose: 0 hides the progress bar (shown on a terminal for a few hundred photos or more).

    Returns:
        The number of images written.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bar = progress.photos(total or 0, verbose)
    count = 0
    for example in examples:
        file_name = example["image/filename"]
        if isinstance(file_name, bytes):
            file_name = file_name.decode()
        target = folder / breed_name(label_names[int(example["label"])]) / pathlib.PurePath(file_name).name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(example["image"])
        count += 1
        bar.update(count)
    # Written last, so an interrupted export is redone instead of trusted.
    (folder / _EXPORT_MARKER).write_text(json.dumps({"images": count}))
    return count


def _export_is_complete(folder):
    marker = folder / _EXPORT_MARKER
    if not marker.is_file():
        return False
    written = sum(1 for sub in subdirectories(folder) for p in sub.iterdir() if is_image(p))
    return written == json.loads(marker.read_text())["images"]


def _require_host(host_port, timeout):
    host, port = host_port
    try:
        socket.create_connection(host_port, timeout=timeout).close()
    except OSError as error:
        raise DataError(
            f"the Stanford Dogs download needs internet, but {host}:{port} cannot be reached ({error}). "
            "Pass --data-dir path/to/dog-breed-identification (the Kaggle layout: labels.csv + train/) "
            "or a class-folder directory (<breed>/*.jpg) instead."
        ) from error
