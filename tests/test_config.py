import argparse

import pytest

from tfdogs import config as config_lib


def parse(argv):
    parser = argparse.ArgumentParser()
    config_lib.add_arguments(parser)
    return config_lib.resolve(parser.parse_args(argv))


def test_defaults_pick_weights_and_strategy_per_model():
    resnet = parse(["--model", "resnet18"])
    assert resnet["weights"] == "imagenet" and resnet["strategy"] == "fine-tune"
    lenet = parse(["--model", "lenet5"])
    assert lenet["weights"] is None and lenet["strategy"] == "scratch"


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: lenet5\nepochs: 7\nlearning_rate: 0.01\nflip: false\n")
    config = parse(["--config", str(path), "--epochs", "3", "--flip"])
    assert config["model"] == "lenet5"
    assert config["epochs"] == 3
    assert config["learning_rate"] == 0.01
    assert config["flip"] is True


def test_resolved_config_round_trips(tmp_path):
    config = parse(["--model", "resnet34", "--data", "synthetic", "--weights", "none", "--epochs", "2",
                    "--verbose", "0", "--cache", "memory"])
    config_lib.write(config, tmp_path / "config.yaml")
    again = parse(["--config", str(tmp_path / "config.yaml")])
    assert again == config


@pytest.mark.parametrize("text, key", [
    ("modle: resnet18\n", "modle"),
    ("epochs: -1\n", "epochs"),
    ("epochs: three\n", "epochs"),
    ("model: vgg16\n", "model"),
    ("precision: half\n", "precision"),
    ("val_fraction: 1.5\n", "val_fraction"),
    ("randaugment: '2'\n", "randaugment"),
    ("randaugment: 2,20\n", "randaugment"),
    ("mixup: -0.1\n", "mixup"),
    ("ema: 1.0\n", "ema"),
    ("monitor: val_loss\n", "monitor"),
    ("model: lenet5\nimage_size: 16\n", "image_size"),
    ("model: lenet5\nweights: imagenet\n", "weights"),
    ("flip: 3\n", "flip"),
    ("model: resnet18\nweights: none\nstrategy: fine-tune\n", "strategy"),
    ("model: resnet18\nweights: none\nstrategy: scratch\nfeature_views: 1\n", "feature_views"),
    ("model: resnet18\nstrategy: feature-extract\nfeature_views: 1\nmixup: 0.2\n", "feature_views"),
    ("model: resnet18\nstrategy: feature-extract\nfeature_views: 1\nrandaugment: 2,9\n", "feature_views"),
    ("model: resnet18\nimage_size: 224\nfinetune_image_size: 192\nfinetune_epochs: 1\n", "finetune_image_size"),
    ("model: resnet18\nimage_size: 224\nfinetune_image_size: 224\nfinetune_epochs: 1\n", "finetune_image_size"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(config_lib.ConfigError, match=f"'{key}'"):
        parse(["--config", str(path)])


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rte: 0.1\n")
    with pytest.raises(config_lib.ConfigError, match="Did you mean 'learning_rate'"):
        parse(["--config", str(path)])


def test_unknown_model_lists_the_allowed_ones():
    with pytest.raises(config_lib.ConfigError, match="lenet5, resnet18, resnet34"):
        parse(["--model", "alexnet"])


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("model: resnet18\nepochs: 3\nlearning_rate: 0.01\nepochs: 30\n")
    with pytest.raises(config_lib.ConfigError, match=r"twice.yaml.*key 'epochs' is given twice \(lines 2 and 4\)"):
        config_lib.load_yaml(path)


@pytest.mark.parametrize("text, value", [("1e-1", 0.1), ("5E-4", 5e-4), ("-2e+1", -20.0), ("1.5e3", 1500.0),
                                         ("3", 3), ("0.25", 0.25), ("1e", "1e"), ("e5", "e5")])
def test_numbers_in_exponent_form_are_numbers(tmp_path, text, value):
    path = tmp_path / "config.yaml"
    path.write_text(f"mixup: {text}\n")
    assert config_lib.load_yaml(path)["mixup"] == value and type(config_lib.load_yaml(path)["mixup"]) is type(value)


def test_an_exponent_is_accepted_where_a_number_is_expected(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("mixup: 1e-1\nlearning_rate: 3e-4\n")
    config = config_lib.validate({**config_lib.DEFAULTS, **config_lib.load_yaml(path)})
    assert config["mixup"] == 0.1 and config["learning_rate"] == 3e-4


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(config_lib.ConfigError, match=r"empty.yaml is empty"):
        config_lib.load_yaml(path)


def test_augmentation_that_cached_features_keep_is_accepted(tmp_path):
    for text in ("model: resnet18\nstrategy: feature-extract\nfeature_views: 2\nmixup: 0.2\n",
                 "model: resnet18\nstrategy: fine-tune\nfeature_views: 1\nmixup: 0.2\n",  # the second phase mixes
                 "model: resnet18\nimage_size: 160\nfinetune_image_size: 224\nfinetune_epochs: 1\n"):
        path = tmp_path / "good.yaml"
        path.write_text(text)
        parse(["--config", str(path)])
