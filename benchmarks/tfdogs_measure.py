"""`tfdogs/bench/measure.py` for the scripts in this folder, loaded by its file path.

The PyTorch scripts run in an environment with torch and torchvision but no
TensorFlow or Keras, and the JAX script on a machine without TensorFlow.
`from tfdogs.bench import measure` would first run `tfdogs/bench/__init__.py`,
which imports Keras and TensorFlow; `measure.py` itself needs only the
standard library, so it is loaded alone, from its file.

    from tfdogs_measure import load_measure   # this folder is the script's sys.path[0]
    measure = load_measure()
"""

import importlib.util
import pathlib
import sys

MEASURE_FILE = pathlib.Path(__file__).resolve().parents[1] / "tfdogs" / "bench" / "measure.py"
MODULE_NAME = "tfdogs_bench_measure"


def load_measure():
    """The `tfdogs.bench.measure` module, loaded from `MEASURE_FILE` without its packages' `__init__`s."""
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, MEASURE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module  # before it runs: dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
