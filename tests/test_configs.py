"""Every shipped config in configs/ loads and validates, and its header shows the commands that run it."""

import argparse
import pathlib
import shlex

import pytest

from tfdogs import config as config_lib

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def header_commands(path):
    """The `python -m tfdogs.train ...` commands in a config's header comment, as argument lists."""
    commands = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("python -m tfdogs.train"):
            commands.append(shlex.split(text)[3:])
    return commands


def test_the_study_configs_and_a_config_per_recommended_backbone_ship():
    names = {path.stem for path in CONFIGS}
    assert {"lenet5", "resnet18", "resnet18-recipe", "resnet34", "resnet34-recipe"} <= names
    assert {"efficientnet_b0", "efficientnet_b3", "resnet50", "vit_base16"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_validates(path):
    values = config_lib.load_yaml(path)
    checked = config_lib.validate({**config_lib.DEFAULTS, **values})
    assert checked["model"] == values["model"]
    if not checked["model"].startswith("keras_hub:"):  # the study's configs are named after their model
        assert checked["model"] == path.stem.removesuffix("-recipe")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_header_shows_the_full_command_and_a_seconds_long_variant_that_validate(path):
    commands = header_commands(path)
    assert len(commands) == 2, "the exact command, then the seconds-long variant"
    for argv in commands:
        assert argv[:2] == ["--config", f"configs/{path.name}"]
        parser = argparse.ArgumentParser()
        config_lib.add_arguments(parser)
        args = parser.parse_args([str(path) if index == 1 else arg for index, arg in enumerate(argv)])
        config_lib.resolve(args)  # raises ConfigError naming the key on any bad value
    assert "--data" in commands[1] and "synthetic" in commands[1]
