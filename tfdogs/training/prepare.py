"""A run's folders and inputs: the output folder, the checked data, its split and pipelines."""

import dataclasses
import datetime
import pathlib
import tempfile

import numpy as np

from tfdogs import config as config_lib, data, models
from tfdogs.data import augment
from tfdogs.data.validation import check_data
from tfdogs.serving import export_folder
from tfdogs.serving.export_folder import DEFAULT_RUNS, default_export_dir
from tfdogs.training import distillation


def output_folders(config):
    """The run folder and the SavedModel base folder of a config.

    Returns:
        (`output`, default runs/<model>-<timestamp>; `export_dir`, default
        `tfdogs.serving.export_folder.default_export_dir` of the run folder).
    """
    name = f"{models.file_name(config['model'])}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    run_dir = pathlib.Path(config["output"] or DEFAULT_RUNS / name)
    return run_dir, pathlib.Path(config["export_dir"] or default_export_dir(run_dir))


# What a run writes before its config.yaml: a folder holding only these is a run killed while starting.
RUN_START_FILES = ("problems.csv", "split.csv", "data_source.json", "converted", "synthetic_data")


def check_run_folder(run_dir):
    """Refuses an existing run folder that holds files no tfdogs run wrote (it would write over them).

    A folder with config.yaml is a run to resume (`check_resumable`); one
    with only what a run writes before it (`RUN_START_FILES`) is a run
    stopped while starting.

    Raises:
        ConfigError: naming the folder and some of the files.
    """
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir() or (run_dir / "config.yaml").is_file():
        return
    foreign = sorted(path.name for path in run_dir.iterdir()
                     if path.name not in RUN_START_FILES and not path.name.startswith("."))
    if foreign:
        raise config_lib.ConfigError(
            f"Config key 'output': {run_dir} holds files that no tfdogs run wrote ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}) and no config.yaml; a run folder is new, empty or a run to "
            f"resume. Give another --output.")


def prepare_output(config):
    """Creates the run and export folders (checking they are writable) before any work.

    Returns:
        The run folder, the export folder, and those of them this call created.
    """
    run_dir, export_dir = output_folders(config)
    check_run_folder(run_dir)
    try:
        export_folder.check_owner(export_dir, run_dir, explicit=config["export_dir"] is not None)
    except export_folder.ExportFolderError as error:
        raise config_lib.ConfigError(f"Config key 'export_dir': {error}") from None
    created = []
    for key, folder in (("output", run_dir), ("export_dir", export_dir)):
        try:
            try:
                folder.mkdir(parents=True)
                created.append(folder)
            except FileExistsError:  # an earlier run's, or made this instant by a second train: the lock decides
                pass
            # A name of its own: two trains started together each write and remove their probe.
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
                pass
        except OSError as error:
            raise config_lib.ConfigError(f"Config key '{key}': cannot write to {folder} ({error.strerror}).") from None
    return run_dir, export_dir, created


def load_data(config, run_dir):
    """Checks the photos, then finds the split (re-using the run's `split.csv` when resuming).

    The check (`tfdogs.check`) lists every problem in `problems.csv`, skips
    unusable files and converts the ones TensorFlow cannot decode into
    `converted/`; with config `strict` anything skipped is an error.

    Returns:
        (records, train_indices, val_indices); the records' paths are the files
        the pipeline reads, and `split.csv` names the original files.
    """
    if config["data"] == "synthetic":
        data_dir = run_dir / "synthetic_data"
        if not (data_dir / "labels.csv").is_file():
            data.make_synthetic(data_dir, num_classes=config["synthetic_classes"],
                                images_per_class=config["synthetic_images_per_class"],
                                image_size=max(64, config["image_size"]), seed=config["seed"])
    elif config["data_dir"]:
        data_dir = config["data_dir"]
    else:
        data_dir = data.load_stanford_dogs()
    report = check_data(data_dir, converted_dir=run_dir / "converted", verbose=config["verbose"] != 0)
    data.write_data_source(run_dir, data_dir)
    report.write_csv(run_dir / "problems.csv")
    if report.problems:
        print(f"Data check: {report.summary()}. Every problem is listed in {run_dir / 'problems.csv'}.")
    if config["strict"]:
        report.require_clean()
    report.require_trainable(config["val_fraction"])
    split_path = run_dir / "split.csv"
    if split_path.is_file():
        check_same_photos(split_path, report)
        records, train_indices, val_indices = data.read_split(split_path, report.records.root)
    else:
        records = report.records
        # Byte-identical copies (groups) go to one side: a photo is never validated on after training on it.
        train_indices, val_indices = data.stratified_split(records.labels, config["val_fraction"], config["seed"],
                                                           groups=report.groups)
        data.write_split(split_path, records, train_indices, val_indices, report.digests)
    # The pipeline reads converted copies where TensorFlow cannot decode the original correctly.
    source_of = dict(zip(report.records.paths, report.sources))
    return dataclasses.replace(records, paths=[source_of[path] for path in records.paths]), train_indices, val_indices


def check_same_photos(split_path, report):
    """Refuses to resume on other photos than the run's `split.csv` lists: added, removed or changed.

    A resumed run goes on with the split it started with; photos added since
    would be announced by the data check and then silently left out.

    Raises:
        DataError: with the count and the first names of each change.
    """
    recorded = data.split_digests(split_path)
    root = pathlib.Path(report.records.root)
    current = {pathlib.Path(path).relative_to(root).as_posix(): digest
               for path, digest in zip(report.records.paths, report.digests)}
    changes = [(what, names) for what, names in (
        ("added", sorted(current.keys() - recorded.keys())),
        ("removed or now unusable", sorted(recorded.keys() - current.keys())),
        ("changed", sorted(name for name, (_, digest) in recorded.items()
                           if digest and name in current and current[name] != digest))) if names]
    if changes:
        listing = "; ".join(f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                            for what, names in changes)
        raise data.DataError(
            f"The photos in {root} differ from the ones this run started with ({split_path}): {listing}; "
            f"unusable ones are listed in {split_path.parent / 'problems.csv'}. A run goes on with its own "
            f"photos; to train on these, start a new run (another --output).")


def evaluation_dataset(config, records, indices, preprocessing):
    """The evaluation crops of `records[indices]` in that order, with one-hot labels."""
    return data.make_dataset(
        [records.paths[i] for i in indices], records.labels[indices], training=False, batch_size=config["batch_size"],
        num_classes=len(records.class_names), **preprocessing.as_dict())


def build_datasets(config, records, train_indices, val_indices, preprocessing, steps_per_epoch=None):
    """The training and validation `tf.data` pipelines of a run, with one-hot labels.

    With config ``teacher``, the training labels are distillation targets
    (`distillation.targets_table`): the pipeline labels each photo by its
    position, one-hot, and the table turns that (mixed or not) into targets.

    Returns:
        (train_epochs, val_dataset): `train_epochs(first_epoch, num_epochs)`
        gives the training batches of those epochs, each epoch's randomness
        keyed by (seed, epoch) (see `data.make_dataset`).
    """
    paths = np.asarray(records.paths)
    common = dict(image_size=config["image_size"], batch_size=config["batch_size"],
                  mean=preprocessing.mean, std=preprocessing.std, crop_fraction=preprocessing.crop_fraction,
                  interpolation=preprocessing.interpolation, resize_rounding=preprocessing.resize_rounding,
                  seed=config["seed"], cache=config["cache"], num_classes=len(records.class_names))
    augmentation = augment.build_augmentation(
        flip=config["flip"], rotation=config["rotation"], zoom=config["zoom"],
        translation=config["translation"], contrast=config["contrast"], seed=config["seed"],
        randaugment=config_lib.parse_randaugment(config["randaugment"]), augmix=config["augmix"],
        random_erasing=config["random_erasing"], mixup=config["mixup"], cutmix=config["cutmix"])

    train_labels, table = records.labels[train_indices], None
    if config["teacher"]:
        table = distillation.targets_table(config["teacher"], config["output"], train_indices, records.labels,
                                           records.class_names, config["distill_temperature"])
        train_labels = np.arange(len(train_indices))

    def train_epochs(first_epoch, num_epochs, part=None):
        dataset = data.make_dataset(
            list(paths[train_indices]), train_labels, training=True,
            augmentation=augmentation, scale=(config["crop_scale_min"], 1.0), first_epoch=first_epoch,
            num_epochs=num_epochs, steps_per_epoch=steps_per_epoch, part=part,
            **{**common, "num_classes": len(train_labels) if table is not None else common["num_classes"]})
        return dataset if table is None else distillation.with_targets(dataset, table)

    val_dataset = data.make_dataset(  # read every epoch: its crops are kept after the first
        list(paths[val_indices]), records.labels[val_indices], training=False, keep_crops=True, **common)
    return train_epochs, val_dataset
