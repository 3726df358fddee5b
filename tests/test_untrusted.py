"""Untrusted files execute nothing: Keras models load in safe mode, configs are plain YAML, splits stay in the data.

The .pth reader (tests/test_port.py: pickled code refused, the command never
runs) and weight downloads (tests/test_port.py: hash verified, corrupt cache
fetched again) are tested beside their modules.
"""

import ast
import pathlib

import h5py
import keras
import numpy as np
import pytest
import yaml
from PIL import Image

from tfdogs import config as config_lib, data, models
from tfdogs.runs import folder as run_folder

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tfdogs"


def model_with_code(marker):
    """A model whose Lambda layer, once deserialised and called, writes `marker`: a stand-in for any payload."""
    inputs = keras.Input((4,))
    # The path is a constant of the function's code, which Keras stores as bytecode.
    payload = eval(f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]")  # noqa: S307 (test payload)
    outputs = keras.layers.Lambda(payload)(inputs)
    return keras.Model(inputs, outputs)


def test_keras_model_loading_refuses_code_and_runs_none(tmp_path):
    marker = tmp_path / "payload-ran"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model_with_code(marker).save(run_dir / "model.keras")
    marker.unlink(missing_ok=True)  # saving traced the layer once

    run = run_folder.Run(run_dir=run_dir, name="run", config={}, class_names=[], preprocessing={})
    with pytest.raises(ValueError, match="safe_mode"):
        run.load_model()
    assert not marker.exists()

    # Control: the file really carries code; loading it unsafely runs it.
    keras.saving.load_model(run_dir / "model.keras", safe_mode=False)
    assert marker.exists()


def test_no_module_turns_safe_loading_off():
    """safe_mode=False, unsafe deserialisation, pickle, yaml.load or torch.load anywhere in tfdogs fails this test."""
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.keyword) and node.arg == "safe_mode" and not (
                    isinstance(node.value, ast.Constant) and node.value.value is True):
                offences.append(f"{path.name}:{node.lineno} safe_mode={ast.unparse(node.value)}")
            if isinstance(node, ast.Attribute) and node.attr in (
                    "enable_unsafe_deserialization", "unsafe_load", "full_load"):
                offences.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "yaml.load" and {
                    kw.arg: ast.unparse(kw.value) for kw in node.keywords}.get("Loader") in SAFE_YAML_LOADERS:
                continue  # a SafeLoader subclass (checked below)
            if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                    "pickle.load", "pickle.loads", "yaml.load", "torch.load", "np.load", "numpy.load"):
                allow = {kw.arg: kw.value for kw in node.keywords}.get("allow_pickle")
                if not (ast.unparse(node.func) in ("np.load", "numpy.load")
                        and (allow is None or (isinstance(allow, ast.Constant) and allow.value is False))):
                    offences.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}")
    assert offences == []
    assert all(issubclass(getattr(config_lib, name), yaml.SafeLoader) for name in SAFE_YAML_LOADERS)


# yaml.load with these loaders is safe: tfdogs' own config reader, a SafeLoader that refuses repeated keys.
SAFE_YAML_LOADERS = {"_StrictLoader"}


def test_config_yaml_with_python_tags_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "config.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\nepochs: 2\n")
    with pytest.raises(config_lib.ConfigError, match="not valid YAML"):
        config_lib.load_yaml(path)
    assert not marker.exists()


def test_split_csv_naming_files_outside_the_data_directory_is_refused(tmp_path):
    root = tmp_path / "data"
    (root / "pug").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "pug" / "a.jpg")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "secret.jpg")
    split = tmp_path / "split.csv"
    split.write_text("path,label,breed,subset\npug/a.jpg,0,pug,train\n../secret.jpg,0,pug,val\n")
    with pytest.raises(data.DataError, match=r"outside the data directory .*secret\.jpg"):
        data.read_split(split, root)


def test_weights_files_hold_arrays_only(tmp_path):
    """.weights.h5, the format runs keep and --weights accepts, stores arrays: loading calls no code."""
    model = models.build("lenet5", 4, input_shape=(32, 32, 3))
    path = tmp_path / "best.weights.h5"
    model.save_weights(path)
    kinds = set()
    with h5py.File(path, "r") as file:
        file.visititems(lambda name, item: kinds.add(type(item).__name__))
        attributes = {key for _, item in file.items() for key in item.attrs}
    assert kinds <= {"Group", "Dataset"}
    assert not any("pickle" in key or "config" in key for key in attributes)
