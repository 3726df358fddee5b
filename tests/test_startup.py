"""Commands import only what they use: matplotlib when a figure is drawn, keras-hub (and its tensorflow-text)
when a ``keras_hub:`` model is built, never when a command starts.

Keras itself imports matplotlib.pyplot and pandas when they are installed (keras.src.visualization and its
array data adapter, both inside a try/except ImportError), so matplotlib's mere absence from `sys.modules`
cannot be checked. Each command is imported in a fresh interpreter with matplotlib made unimportable
instead: Keras then does without it, and the command must as well.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAZY = ("matplotlib", "keras_hub", "tensorflow_text")
PROBE = """\
import sys
sys.modules["matplotlib"] = None  # importing it now raises ImportError
import {module}
print(sorted(name for name in {lazy!r} if sys.modules.get(name) is not None))
"""


def run_python(code, **environment):
    """Runs `code` in a fresh interpreter at the repository root; returns its last line of output."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, **environment})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("module", ["tfdogs.train", "tfdogs.predict"])
def test_a_command_starts_without_matplotlib_or_keras_hub(module):
    assert run_python(PROBE.format(module=module, lazy=LAZY)) == "[]"


def test_figures_are_still_drawn_with_the_agg_backend(tmp_path):
    """The backend is chosen with the first figure now, not on import: a file-only backend all the same."""
    code = ("import matplotlib\n"
            "from tfdogs.evaluation import plots\n"
            f"plots.plot_reliability({{}}, {str(tmp_path / 'reliability.png')!r})\n"
            "print(matplotlib.get_backend().lower())")
    assert run_python(code, MPLBACKEND="svg") == "agg"
    assert (tmp_path / "reliability.png").read_bytes().startswith(b"\x89PNG")


ONEDNN_NOTICE = "oneDNN custom operations are on"


@pytest.mark.parametrize("chosen, on", [(None, True), ("0", False), ("1", True)])
def test_tensorflows_onednn_kernels_are_on_unless_the_user_turns_them_off(chosen, on):
    """TensorFlow says at INFO level, as it loads, whether its oneDNN kernels are on; tfdogs asks for them."""
    environment = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    environment["TF_CPP_MIN_LOG_LEVEL"] = "0"
    if chosen is not None:
        environment["TF_ENABLE_ONEDNN_OPTS"] = chosen
    code = "import os, tfdogs, tensorflow; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"
    done = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == (chosen or "1")
    assert (ONEDNN_NOTICE in done.stderr) == on, done.stderr[-2000:]
