"""Experiment configuration: defaults, YAML files, command-line overrides, validation.

A run is described by one flat mapping of keys (see `DEFAULTS`). A YAML file
supplies values, command-line flags override them, and the resolved mapping is
written beside every run (`config.yaml`) and every export, so any run can be
repeated with `python -m tfdogs.train --config RUN/config.yaml`.
"""

import argparse
import difflib
import os
import pathlib

import yaml

MODEL_NAMES = ("lenet5", "resnet18", "resnet34")
# Any keras-hub image backbone: keras_hub:PRESET (a preset name, a handle or a local preset directory;
# tfdogs.models.hub). Its weights are the preset's: weights "preset" (the default) or none.
HUB_PREFIX = "keras_hub:"
HUB_WEIGHTS = "preset"

# Every key a run understands, with its default. The type of the default is
# the type a value must have (None-valued keys take a string or null).
DEFAULTS = {
    "model": "resnet18",
    "data": None,
    "data_dir": None,
    "strict": False,
    "weights": "auto",
    "weights_preprocessing": "auto",
    "strategy": "auto",
    "epochs": 10,
    "head_epochs": 2,
    "batch_size": 32,
    "image_size": 224,
    "optimizer": "adam",
    "learning_rate": 1e-3,
    "backbone_lr_factor": 0.1,
    "momentum": 0.9,
    "weight_decay": None,
    "schedule": "cosine",
    "warmup_epochs": 0,
    "dropout": 0.2,
    "l1": 0.0,
    "l2": 0.0,
    "freeze_bn": False,
    "label_smoothing": 0.0,
    "val_fraction": 0.2,
    "seed": 0,
    "flip": True,
    "rotation": 0.05,
    "zoom": 0.1,
    "translation": 0.1,
    "contrast": 0.1,
    "crop_scale_min": 0.25,
    "randaugment": None,
    "augmix": False,
    "random_erasing": 0.0,
    "mixup": 0.0,
    "cutmix": 0.0,
    "ema": 0.0,
    "monitor": "auto",
    "calibrate": True,
    "cache": None,
    "early_stopping_patience": 5,
    "jit_compile": "auto",
    "precision": "auto",
    "distribute": "auto",
    "output": None,
    "export_dir": None,
    "synthetic_classes": 6,
    "synthetic_images_per_class": 30,
    "steps_per_epoch": None,
    "finetune_image_size": None,
    "finetune_epochs": 1,
    "verbose": "auto",
}

CHOICES = {
    "model": MODEL_NAMES,
    "data": (None, "synthetic", "stanford_dogs"),
    "weights_preprocessing": ("auto", "torchvision", "timm"),
    "strategy": ("auto", "scratch", "feature-extract", "fine-tune", "discriminative"),
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("cosine", "constant"),
    "jit_compile": ("auto", "on", "off"),
    "precision": ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
    "distribute": ("auto", "none", "mirrored", "multi-worker"),
    "verbose": ("auto", 0, 1, 2),
    "monitor": ("auto", "val_accuracy", "val_log_loss"),
}

# Decoupled weight decay when `weight_decay` is null: none for Adam, PyTorch's AdamW default, and
# the torchvision ImageNet recipe's value for SGD.
DEFAULT_WEIGHT_DECAY = {"adam": 0.0, "adamw": 0.01, "sgd": 1e-4}
# Keys whose null default is resolved to a number (see `validate`), and whole-number keys that may be null.
NUMBER_OR_NULL = ("weight_decay",)
WHOLE_OR_NULL = ("steps_per_epoch", "finetune_image_size")

# (key, lowest allowed, highest allowed, whether the lowest itself is allowed)
RANGES = (
    ("epochs", 1, None, True),
    ("head_epochs", 0, None, True),
    ("batch_size", 1, None, True),
    ("image_size", 16, None, True),
    ("learning_rate", 0.0, None, False),
    ("backbone_lr_factor", 0.0, 1.0, True),
    ("momentum", 0.0, 1.0, True),
    ("warmup_epochs", 0, None, True),
    ("weight_decay", 0.0, None, True),
    ("dropout", 0.0, 0.99, True),
    ("l1", 0.0, None, True),
    ("l2", 0.0, None, True),
    ("label_smoothing", 0.0, 0.99, True),
    ("val_fraction", 0.0, 0.9, False),
    ("seed", 0, None, True),
    ("rotation", 0.0, 0.5, True),
    ("zoom", 0.0, 0.9, True),
    ("translation", 0.0, 0.5, True),
    ("contrast", 0.0, 1.0, True),
    ("crop_scale_min", 0.0, 1.0, False),
    ("random_erasing", 0.0, 1.0, True),
    ("mixup", 0.0, None, True),
    ("cutmix", 0.0, None, True),
    ("ema", 0.0, 0.99999, True),
    ("early_stopping_patience", 0, None, True),
    ("synthetic_classes", 2, None, True),
    ("synthetic_images_per_class", 2, None, True),
    ("steps_per_epoch", 1, None, True),
    ("finetune_image_size", 32, None, True),
    ("finetune_epochs", 1, None, True),
)

HELP = {
    "model": "network to train: lenet5, resnet18, resnet34, or keras_hub:PRESET for any keras-hub image "
    "backbone (a preset name such as resnet_50_imagenet, a kaggle:// or hf:// handle, or a local preset folder)",
    "data": "built-in data source: 'synthetic' (offline demo) or 'stanford_dogs' "
    "(tensorflow-datasets download); the default when no --data-dir is given",
    "data_dir": "labelled photos: Kaggle layout (labels.csv + train/) or one folder per breed",
    "strict": "fail when the data check (python -m tfdogs.check) would skip any file or labels.csv row, "
    "instead of skipping and listing them in problems.csv",
    "weights": "auto (imagenet for ResNets, none for LeNet-5, preset for keras_hub:PRESET), none (random init), "
    "imagenet (torchvision), timm (timm a1_in1k), timm:NAME (another timm checkpoint in the registry), preset "
    "(a keras-hub preset's own) or a .pth/.safetensors/.weights.h5 path",
    "weights_preprocessing": "input preprocessing of a --weights file the registry does not know (by SHA-256): "
    "auto (torchvision's, said in the output), torchvision (bilinear, crop 0.875) or timm (bicubic, crop 0.95, "
    "floor rounding); registry weights always bring their own",
    "strategy": "auto (scratch without weights, else fine-tune), scratch, feature-extract "
    "(frozen backbone), fine-tune (head first, then all) or discriminative (per-stage rates)",
    "epochs": "total training epochs",
    "head_epochs": "fine-tune: epochs that train only the head before the whole network",
    "batch_size": "images per training step",
    "image_size": "square input size in pixels",
    "optimizer": "adam, adamw or sgd (with --momentum)",
    "learning_rate": "peak learning rate (of the head, where rates differ)",
    "backbone_lr_factor": "fine-tune/discriminative: backbone rate as a fraction of the head's",
    "momentum": "SGD momentum",
    "weight_decay": "decoupled weight decay, scaled like each variable's learning rate and never applied to "
    "biases or BatchNorm; default 0 for adam, 0.01 for adamw, 1e-4 for sgd",
    "schedule": "learning-rate schedule over the run: cosine decay or constant",
    "warmup_epochs": "epochs of linear warm-up before the schedule",
    "dropout": "dropout rate before the classifier",
    "l1": "L1 penalty on the classifier weights",
    "l2": "L2 penalty on the classifier weights",
    "freeze_bn": "keep BatchNorm statistics frozen while fine-tuning (BatchNorm normalises with its "
    "moving statistics, as PyTorch's bn.eval(); gamma and beta still train)",
    "label_smoothing": "label smoothing of the training loss",
    "val_fraction": "fraction of each breed held out for validation",
    "seed": "one seed for the split, initialisation, shuffling and augmentation",
    "flip": "random horizontal flips",
    "rotation": "random rotation, as a fraction of a full turn",
    "zoom": "random zoom range",
    "translation": "random translation, as a fraction of the size",
    "contrast": "random contrast factor",
    "crop_scale_min": "smallest area fraction of a random-resized crop",
    "randaugment": "RandAugment 'N,M': N random operations of magnitude M (of 10) per batch, e.g. '2,9' "
    "(default off)",
    "augmix": "AugMix augmentation",
    "random_erasing": "probability of erasing a random rectangle of each training image",
    "mixup": "MixUp: Beta(alpha, alpha) mixing of image pairs and their labels (0: off; 0.2 is usual)",
    "cutmix": "CutMix: pasted patches, labels mixed by area, Beta(alpha, alpha) (0: off; 1.0 is usual)",
    "ema": "exponential moving average of the weights with this decay (e.g. 0.999), used for validation, "
    "the best checkpoint and the export (0: off)",
    "monitor": "what the best checkpoint and early stopping follow: auto (val_log_loss for the Kaggle layout, "
    "scored by log loss, else val_accuracy), val_accuracy, val_log_loss",
    "calibrate": "fit a temperature on the validation logits after training and serve calibrated "
    "probabilities (--no-calibrate: off)",
    "cache": "cache decoded images: 'memory' or a file prefix (default off)",
    "early_stopping_patience": "epochs without validation-accuracy gain before stopping (0: never)",
    "jit_compile": "XLA compilation: auto (on with a GPU, off on CPU), on, off",
    "precision": "auto (mixed_float16 on GPU; on CPU mixed_bfloat16 for ResNets where the CPU has native "
    "bfloat16, else float32), float32, mixed_float16, mixed_bfloat16",
    "distribute": "devices: auto (multi-worker with a TF_CONFIG cluster, mirrored with several GPUs, "
    "else none), none, mirrored (all local GPUs), multi-worker (TF_CONFIG); --batch-size is per "
    "replica and the learning rate scales with the replicas",
    "output": "run folder (default runs/<model>-<timestamp>)",
    "export_dir": "SavedModel base folder (default saved_models/<run name>)",
    "synthetic_classes": "--data synthetic: number of classes",
    "synthetic_images_per_class": "--data synthetic: images per class",
    "steps_per_epoch": "cap on training steps per epoch (default: the whole training set)",
    "finetune_image_size": "train the last --finetune-epochs epochs at this larger size, which the export then "
    "uses (the train/test resolution effect; ResNets only)",
    "finetune_epochs": "with --finetune-image-size: how many of the last epochs train at that size",
    "verbose": "Keras progress output: auto, 0, 1 or 2",
}


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


def _unknown_key_message(key, source):
    close = difflib.get_close_matches(key, DEFAULTS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"Unknown config key '{key}' in {source}.{hint} Known keys: {', '.join(DEFAULTS)}."


def load_yaml(path):
    """Reads a config file into a mapping, rejecting unknown keys.

    Args:
        path: YAML file with a flat mapping of keys from `DEFAULTS`.

    Returns:
        The mapping as written in the file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"Config file {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of keys, not {type(values).__name__}.")
    for key in values:
        if key not in DEFAULTS:
            raise ConfigError(_unknown_key_message(key, path))
    return values


def _check_type(key, value):
    default = DEFAULTS[key]
    if value is None:
        if key == "weights":
            return "none"
        if default is not None:
            raise ConfigError(f"Config key '{key}' needs a value (default {default!r}), got null.")
        return value
    if key == "model" and isinstance(value, str) and value.startswith(HUB_PREFIX):
        if not value[len(HUB_PREFIX):].strip():
            raise ConfigError(f"Config key 'model' is {value!r}; name the preset after {HUB_PREFIX!r}, e.g. "
                              f"{HUB_PREFIX}resnet_50_imagenet or {HUB_PREFIX}/path/to/preset_dir.")
        return value
    if key in CHOICES:
        choices = CHOICES[key]
        if isinstance(value, str) and value.isdigit() and int(value) in choices:
            value = int(value)
        if value not in choices:
            allowed = ", ".join(str(choice) for choice in choices if choice is not None)
            if key == "model":
                allowed += f", {HUB_PREFIX}PRESET (any keras-hub image backbone)"
            raise ConfigError(f"Config key '{key}' is {value!r}; allowed values: {allowed}.")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"Config key '{key}' must be true or false, got {value!r}.")
        return value
    if isinstance(default, int) or key in WHOLE_OR_NULL:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"Config key '{key}' must be a whole number, got {value!r}.")
        return value
    if isinstance(default, float) or key in NUMBER_OR_NULL:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"Config key '{key}' must be a number, got {value!r}.")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"Config key '{key}' must be a string, got {value!r}.")
    return value


def parse_randaugment(value):
    """The `randaugment` key `"N,M"` (N operations of magnitude M out of 10, timm's `rand-mM-nN`) -> (N, M).

    Returns None when it is off (null).

    Raises:
        ConfigError: naming the key, for anything but two numbers N in 1-10 (whole) and M in 0-10.
    """
    if value is None:
        return None
    try:
        count, magnitude = (float(part) for part in str(value).split(","))
    except ValueError:
        count = magnitude = -1.0
    if count != int(count) or not 1 <= count <= 10 or not 0 <= magnitude <= 10:
        raise ConfigError(f"Config key 'randaugment' is {value!r}; expected 'N,M' with N a whole number 1-10 "
                          "and M in 0-10, e.g. '2,9' (2 operations of magnitude 9).")
    return int(count), magnitude


def validate(config):
    """Checks every key and value of a resolved config before any work starts.

    Args:
        config: mapping with exactly the keys of `DEFAULTS`.

    Returns:
        A new mapping with values normalised (ints where choices are ints,
        floats for float keys, `weights` "none" turned into None).

    Raises:
        ConfigError: naming the first bad key and what it allows.
    """
    for key in config:
        if key not in DEFAULTS:
            raise ConfigError(_unknown_key_message(key, "the config"))
    checked = {key: _check_type(key, config.get(key, DEFAULTS[key])) for key in DEFAULTS}
    for key, low, high, low_inclusive in RANGES:
        value = checked[key]
        if value is None:
            continue
        too_low = value < low if low_inclusive else value <= low
        if too_low or (high is not None and value > high):
            bound = f">= {low}" if low_inclusive else f"> {low}"
            if high is not None:
                bound += f" and <= {high}"
            raise ConfigError(f"Config key '{key}' is {value}; it must be {bound}.")
    parse_randaugment(checked["randaugment"])  # refuses a malformed value now, naming the key
    if checked["weight_decay"] is None:
        checked["weight_decay"] = DEFAULT_WEIGHT_DECAY[checked["optimizer"]]
    hub = checked["model"].startswith(HUB_PREFIX)
    if checked["weights"] == "auto":
        checked["weights"] = None if checked["model"] == "lenet5" else HUB_WEIGHTS if hub else "imagenet"
    elif checked["weights"].lower() == "none":
        checked["weights"] = None
    if checked["weights"] is not None and hub != (checked["weights"] == HUB_WEIGHTS):
        raise ConfigError(
            f"Config key 'weights' is {checked['weights']!r}, but "
            + (f"{checked['model']} takes its weights from its preset; use weights: {HUB_WEIGHTS} (or none)."
               if hub else f"only keras_hub:PRESET models have {HUB_WEIGHTS!r} weights."))
    if checked["strategy"] == "auto":
        checked["strategy"] = "scratch" if checked["weights"] is None else "fine-tune"
    elif checked["strategy"] != "scratch" and checked["weights"] is None:
        raise ConfigError(
            f"Config key 'strategy' is {checked['strategy']!r}, which transfers pretrained weights, "
            "but 'weights' is none; use strategy: scratch or give weights."
        )
    if checked["model"] == "lenet5":
        if checked["weights"] is not None:
            raise ConfigError(
                f"Config key 'weights' is {checked['weights']!r}, but lenet5 has no pretrained "
                "weights; use weights: none."
            )
        if checked["image_size"] < 32:
            raise ConfigError(f"Config key 'image_size' is {checked['image_size']}; lenet5 needs >= 32.")
    elif checked["image_size"] < 32:
        raise ConfigError(
            f"Config key 'image_size' is {checked['image_size']}; {checked['model']} needs >= 32 "
            "(it downsamples by 32)."
        )
    if checked["finetune_image_size"] is not None:
        if checked["model"] == "lenet5":
            raise ConfigError("Config key 'finetune_image_size' needs a ResNet: lenet5's classifier is sized for "
                              "one input size.")
        first_epochs = checked["epochs"] - checked["finetune_epochs"]
        earlier = checked["head_epochs"] if checked["strategy"] == "fine-tune" else 0
        if first_epochs <= earlier:
            raise ConfigError(
                f"Config key 'finetune_epochs' is {checked['finetune_epochs']}; it must leave epochs before it "
                f"at image_size (epochs {checked['epochs']}"
                + (f", head_epochs {earlier}" if earlier else "") + ").")
    if checked["data"] is not None and checked["data_dir"] is not None:
        raise ConfigError("Config keys 'data' and 'data_dir' are both set; give one source of photos.")
    if checked["head_epochs"] >= checked["epochs"] and checked["strategy"] == "fine-tune":
        raise ConfigError(
            f"Config key 'head_epochs' is {checked['head_epochs']}; with strategy fine-tune it must be "
            f"below 'epochs' ({checked['epochs']}) so the whole network trains too."
        )
    return checked


def add_arguments(parser):
    """Adds one flag per config key (`--learning-rate` for `learning_rate`) plus `--config`."""
    parser.add_argument("--config", help="YAML file of settings; flags override it")
    for key, default in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=key, default=None, action=argparse.BooleanOptionalAction, help=HELP[key])
        elif isinstance(default, float) or key in NUMBER_OR_NULL:
            parser.add_argument(flag, dest=key, default=None, type=float, help=HELP[key])
        elif isinstance(default, int) or key in WHOLE_OR_NULL:
            parser.add_argument(flag, dest=key, default=None, type=int, help=HELP[key])
        else:
            parser.add_argument(flag, dest=key, default=None, help=HELP[key])


def resolve(args):
    """Merges defaults, the `--config` file and command-line flags, then validates.

    Args:
        args: `argparse.Namespace` from a parser set up by `add_arguments`.

    Returns:
        The validated config mapping.
    """
    config = dict(DEFAULTS)
    explicit = {key: value for key, value in vars(args).items() if key in DEFAULTS and value is not None}
    if getattr(args, "config", None):
        config.update(load_yaml(args.config))
    config.update(explicit)
    return validate(config)


def write(config, path):
    """Writes a resolved config as YAML, in `DEFAULTS` key order."""
    path = pathlib.Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    os.replace(temporary, path)
