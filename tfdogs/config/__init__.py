"""Experiment configuration: defaults, YAML files, command-line overrides, validation.

A run is described by one flat mapping of keys (see `DEFAULTS`). A YAML file
supplies values, command-line flags override them, and the resolved mapping is
written beside every run (`config.yaml`) and every export, so any run can be
repeated with `python -m tfdogs.train --config RUN/config.yaml`.
"""

import argparse
import difflib
import pathlib
import re

import yaml

from tfdogs import files
from tfdogs.config.keys import (BOOL_OR_AUTO, CHOICES, DEFAULT_WEIGHT_DECAY, DEFAULTS, HELP, NUMBER_OR_NULL, RANGES,
                                WHOLE_OR_NULL)

# Any keras-hub image backbone: keras_hub:PRESET (a preset name, a handle or a local preset directory;
# tfdogs.models.hub). Its weights are the preset's: weights "preset" (the default) or none.
from tfdogs.models import HUB_WEIGHTS, LITE_PREFIX
from tfdogs.models.hub import PREFIX as HUB_PREFIX


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


def _unknown_key_message(key, source):
    close = difflib.get_close_matches(key, DEFAULTS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"Unknown config key '{key}' in {source}.{hint} Known keys: {', '.join(DEFAULTS)}."


class _StrictLoader(yaml.SafeLoader):
    """YAML as a config file means it: a key given twice is an error, and `1e-1` is a number.

    PyYAML follows YAML 1.1, where a float needs a dot (`1e-1` is a string)
    and a repeated key silently keeps the last value.
    """

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"key '{key}' is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(  # YAML 1.2's floats without a dot: 1e-1, 5E3, -2e+4
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text):
    """A YAML value the way config files are read (`_StrictLoader`): also for `--set KEY=VALUE`."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


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
        values = parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"Config file {path} is not valid YAML: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"Config file {path} cannot be read: {error}") from None
    if values is None:
        raise ConfigError(f"Config file {path} is empty; it would mean every default. Give at least one key "
                          f"(e.g. model: resnet18), or leave out --config.")
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
    if isinstance(default, bool) or key in BOOL_OR_AUTO:
        if not isinstance(value, bool) and not (key in BOOL_OR_AUTO and value == "auto"):
            raise ConfigError(f"Config key '{key}' must be true or false{' or auto' * (key in BOOL_OR_AUTO)}, "
                              f"got {value!r}.")
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
    if checked["freeze_bn"] == "auto":
        checked["freeze_bn"] = checked["model"].startswith(LITE_PREFIX)
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
        if checked["finetune_image_size"] <= checked["image_size"]:
            raise ConfigError(
                f"Config key 'finetune_image_size' is {checked['finetune_image_size']}, not larger than image_size "
                f"{checked['image_size']}: the last epochs train at a larger size (FixRes), which the export then "
                f"serves. Give a larger size, or leave it out.")
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
    if checked["feature_views"] and checked["strategy"] not in ("feature-extract", "fine-tune"):
        raise ConfigError(
            f"Config key 'feature_views' is {checked['feature_views']}, but strategy {checked['strategy']} never "
            "freezes the backbone, so there are no features to cache; use feature-extract or fine-tune, or 0.")
    ignored = [key for key in ("mixup", "cutmix", "random_erasing", "randaugment", "augmix") if checked[key]]
    if checked["feature_views"] == 1 and checked["strategy"] == "feature-extract" and ignored:
        raise ConfigError(
            f"Config key 'feature_views' is 1: every epoch trains on the cached evaluation crop of each photo, with "
            f"no augmentation, so {', '.join(ignored)} would do nothing. Use feature_views >= 2 (that many "
            f"augmented views) or 0, or leave out {', '.join(ignored)}.")
    return checked


# The train command's --help, and docs/configuration.md, show the keys in these groups, in this order.
GROUPS = (
    ("data", "where the photos come from and how they are split", (
        "data", "data_dir", "strict", "val_fraction", "folds", "synthetic_classes",
        "synthetic_images_per_class")),
    ("model", "the network, its starting weights and its input", (
        "model", "weights", "weights_preprocessing", "head_init", "image_size", "dropout", "l1", "l2")),
    ("training", "what trains, how fast, and for how long", (
        "strategy", "epochs", "head_epochs", "batch_size", "optimizer", "learning_rate", "backbone_lr_factor",
        "momentum", "weight_decay", "schedule", "warmup_epochs", "freeze_bn", "label_smoothing", "ema", "monitor",
        "early_stopping_patience", "calibrate", "finetune_image_size", "finetune_epochs", "steps_per_epoch",
        "seed", "teacher", "distill_temperature", "distill_alpha")),
    ("augmentation", "what the training photos go through (validation photos get the evaluation crop only)", (
        "flip", "rotation", "zoom", "translation", "contrast", "crop_scale_min", "randaugment", "augmix",
        "random_erasing", "mixup", "cutmix")),
    ("speed and devices", "the same training, computed differently", (
        "cache", "feature_views", "frozen_inference", "jit_compile", "precision", "distribute")),
    ("output", "where the run goes and what it prints", ("output", "export_dir", "verbose")),
)


def grouped_keys():
    """Every key of `DEFAULTS` once, as (group name, description, keys); keys no group names come last."""
    named = {key for _, _, keys in GROUPS for key in keys}
    others = tuple(key for key in DEFAULTS if key not in named)
    groups = [(name, about, tuple(key for key in keys if key in DEFAULTS)) for name, about, keys in GROUPS]
    return groups + ([("other", "", others)] if others else [])


def add_arguments(parser):
    """Adds one flag per config key (`--learning-rate` for `learning_rate`), in `GROUPS`, plus `--config`."""
    parser.add_argument("--config", help="YAML file of settings; flags override it")
    for name, about, keys in grouped_keys():
        group = parser.add_argument_group(name, about)
        for key in keys:
            _add_flag(group, key)


def _add_flag(group, key):
    # A flag left out stays out of the namespace (SUPPRESS), so `resolve` can tell it from a value given; the
    # help states the table's default instead of argparse's None.
    default, flag = DEFAULTS[key], "--" + key.replace("_", "-")
    shown = "true" if default is True else "false" if default is False else default
    help_text = HELP[key] if default is None or "default" in HELP[key] else f"{HELP[key]} (default: {shown})"
    options = dict(dest=key, default=argparse.SUPPRESS, help=help_text)
    if isinstance(default, bool) or key in BOOL_OR_AUTO:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
    elif isinstance(default, float) or key in NUMBER_OR_NULL:
        group.add_argument(flag, type=float, **options)
    elif isinstance(default, int) or key in WHOLE_OR_NULL:
        group.add_argument(flag, type=int, **options)
    else:
        group.add_argument(flag, **options)


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
    files.replace_into(path, lambda temporary: temporary.write_text(yaml.safe_dump(dict(config), sort_keys=False)))
