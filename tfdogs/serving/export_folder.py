"""Which run an export folder serves: one default folder per run, and no second run in it unless asked.

TF Serving serves the highest numbered version under a model's base folder,
so two runs exporting into one base folder would serve whichever exported
last. Each version's `tfdogs.json` names the folder it came from (`run`: a
run or ensemble folder, absolute); `check_owner` compares it before a new
version is written.
"""

import hashlib
import json
import pathlib

from tfdogs.serving.saved_model import METADATA_FILE

DEFAULT_RUNS = pathlib.Path("runs")
DEFAULT_EXPORTS = pathlib.Path("saved_models")


class ExportFolderError(ValueError):
    """An export folder already serves another run."""


def default_export_dir(source):
    """The base folder a run's (or an ensemble's) versions go to when none is given.

    `runs/<name>` (the default place, relative to the working directory)
    exports to `saved_models/<name>`. A folder anywhere else adds the first 8
    hex digits of its absolute path's SHA-256 (`saved_models/<name>-3f2a9c1e`):
    `a/run` and `b/run` get different folders, and the same run always the same.

    Args:
        source: the run or ensemble folder.
    """
    source = pathlib.Path(source).resolve()
    if source.parent == DEFAULT_RUNS.resolve():
        return DEFAULT_EXPORTS / source.name
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:8]
    return DEFAULT_EXPORTS / f"{source.name}-{digest}"


def served_runs(export_base):
    """The folders the versions under `export_base` were exported from, by version number."""
    runs = {}
    for metadata in sorted(pathlib.Path(export_base).glob(f"*/{METADATA_FILE}")):
        if metadata.parent.name.isdigit():
            try:
                runs[int(metadata.parent.name)] = json.loads(metadata.read_text()).get("run")
            except (OSError, ValueError):
                runs[int(metadata.parent.name)] = None
    return runs


def check_owner(export_base, source, explicit):
    """Refuses to add a version of `source` to a folder whose versions come from another run.

    Args:
        export_base: the SavedModel base folder.
        source: the run or ensemble folder being exported.
        explicit: the user named `export_base` (`--export-dir`, `--output`):
            a new version of another run is then what they asked for.

    Raises:
        ExportFolderError: naming the folder, the run it serves, and the flag that allows it.
    """
    if explicit:
        return
    source = str(pathlib.Path(source).resolve())
    others = sorted({run for run in served_runs(export_base).values() if run != source}, key=str)
    if others:
        raise ExportFolderError(
            f"{export_base} already serves {others[0]}, not {source}; TF Serving would serve whichever exported "
            f"last. Give --export-dir to add this run there on purpose, or another folder.")
