"""Heat maps for `python -m tfdogs.predict --explain DIR`: where the model saw the breed it answered.

One PNG per answered photo, `DIR/<photo name>.png`: the Grad-CAM map
(`tfdogs.evaluation.gradcam`) of the predicted breed over the centre crop the model
sees, at 224 px. An ensemble's map is its members' maps averaged with the
ensemble's weights. A SavedModel keeps no layers to explain, so `--explain`
needs the run or ensemble folder.

Example:
    python -m tfdogs.predict runs/resnet18-20240101-120000 photos/ --json --explain why/
"""

import pathlib

from tfdogs.evaluation import gradcam
from tfdogs.runs.folder import ENSEMBLE_FILE, RunFolderError, load_ensemble, load_run


class ExplainError(ValueError):
    """A model folder that cannot be explained; the message says why."""


def load_members(model):
    """The (runs, weights) of a run or ensemble folder.

    Raises:
        ExplainError: a SavedModel or anything else, or an unreadable folder.
    """
    path = pathlib.Path(model)
    try:
        if (path / ENSEMBLE_FILE).is_file():
            return load_ensemble(path)
        if (path / "config.yaml").is_file():
            return [load_run(path)], [1.0]
    except RunFolderError as error:
        raise ExplainError(str(error)) from None
    raise ExplainError(f"--explain needs a run or ensemble folder: {path} is a SavedModel or neither, "
                       "and a SavedModel keeps no layers to explain.")


def add_explanations(model, results, folder):
    """Writes the heat map of each answered photo's top breed and adds its path to the answer as `explanation`.

    Args:
        model: the run or ensemble folder that answered.
        results: `tfdogs.predict` answers ({"image", "top5"} or {"image", "error"}), changed in place.
        folder: where the PNGs go (created).

    Raises:
        ExplainError: see `load_members`.
    """
    runs, member_weights = load_members(model)
    answered = [result for result in results if "top5" in result]
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not answered:
        return
    index_of = {name: position for position, name in enumerate(runs[0].class_names)}
    explainers = [gradcam.Explainer(run.load_model()) for run in runs]
    overlays = gradcam.explain_paths(explainers, member_weights, [result["image"] for result in answered],
                                     [index_of[result["top5"][0]["breed"]] for result in answered],
                                     [run.preprocessing for run in runs])
    taken = set()
    for result, overlay in zip(answered, overlays):
        if overlay is None:
            result["explanation"] = None
            continue
        stem, suffix = pathlib.Path(result["image"]).stem, 1
        name = f"{stem}.png"
        while name in taken:  # photos of the same name from different folders
            suffix += 1
            name = f"{stem}-{suffix}.png"
        taken.add(name)
        overlay.save(folder / name)
        result["explanation"] = str(folder / name)
