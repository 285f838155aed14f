"""The one checkpoint loader: read and write weights in every format this project meets.

Readers return a flat ``{name: numpy array}`` state dict, whatever the source:
- ``.safetensors`` (single file, or a folder with ``*.safetensors.index.json`` shards), parsed here
  and memory-mapped, so no torch is needed and half-precision files stay half precision;
- ``.pth`` / ``.pt`` / ``.bin`` (PyTorch zip pickles), read by a restricted unpickler that only
  rebuilds tensors and plain containers: a pickle that references anything else (``os.system``...)
  is refused before it can run;
- ``.ckpt`` (MindSpore);
- a folder holding any of the above (a diffusers ``transformer/`` or transformers ``text_encoder/``).

Writers (``save_ckpt``, ``save_safetensors``) write to a temporary file and rename it, so an
interrupted save never leaves a truncated checkpoint behind.
"""
import errno
import glob
import json
import os
import pickle
import struct
import tempfile
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np

from pixart.utils.errors import CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}

_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


# ----------------------------------------------------------------------------- safetensors


def _read_safetensors_header(path):
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (bad header)") from None
    return header, 8 + size


def read_safetensors_metadata(path):
    """The ``__metadata__`` strings of a .safetensors file ({} if none); reads only the header."""
    header, _ = _read_safetensors_header(path)
    return header.get("__metadata__") or {}


def read_safetensors(path, copy_on_write=False):
    """Memory-map a .safetensors file into ``{name: read-only numpy array}`` (``copy_on_write``:
    writable arrays whose writes stay private to the process; see ``to_tensor``)."""
    header, data_start = _read_safetensors_header(path)
    header.pop("__metadata__", None)
    mapped = np.memmap(path, dtype=np.uint8, mode="c" if copy_on_write else "r")
    state = OrderedDict()
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        state[name] = mapped[data_start + start:data_start + end].view(dtype).reshape(info["shape"])
    return state


def save_safetensors(state, path, metadata=None):
    """Write ``{name: array}`` as a .safetensors file, atomically."""
    header, offset, arrays = {}, 0, []
    for name, value in state.items():
        arr = np.ascontiguousarray(_to_numpy(value))
        if arr.dtype not in _SAFETENSORS_NAMES:
            raise CheckpointError(f"cannot store {name} of dtype {arr.dtype} in safetensors")
        header[name] = {"dtype": _SAFETENSORS_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data must start 8-byte aligned

    def write(f):
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())

    _atomic_write(path, write)


# ----------------------------------------------------------------------------- torch pickles


class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co. inside the restricted unpickler."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
    return np.array(view)  # own, contiguous copy


def _rebuild_parameter(data, *_):
    return data


def _rebuild_from_type(func, _new_type, args, _state):
    return func(*args)


class _TensorMarker:
    """Stands in for torch.Tensor / torch.nn.Parameter classes; never instantiated."""


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TensorMarker,
    ("torch.nn.parameter", "Parameter"): _TensorMarker,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a PyTorch zip checkpoint into numpy arrays without importing torch.

    Only the globals in ``_SAFE_GLOBALS`` and torch storage types resolve; any other global
    (the only way a pickle can run code) raises before it is called.
    """

    def __init__(self, file, archive, prefix, path):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages = {}

    def find_class(self, module, name):
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(_TORCH_STORAGE_DTYPES[name])
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise CheckpointError(
            f"refusing to load {self.path}: its pickle references {module}.{name}, which could run "
            "code; only tensors and plain containers are allowed")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"refusing to load {self.path}: unknown persistent id {pid!r:.60}")
        _, storage_type, key, _location, _numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"refusing to load {self.path}: bad storage type in pickle")
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}/data/{key}")
            self.storages[key] = np.frombuffer(raw, dtype=storage_type.dtype)
        return self.storages[key]


def _fsync_path(path, flags):
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_torch_pickle(path):
    """Read a PyTorch zip checkpoint (.pth/.pt/.bin) safely; returns the unpickled object."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a PyTorch zip checkpoint (the legacy pre-1.6 format is not read); "
            "re-save it with torch.save from a recent PyTorch")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise CheckpointError(f"{path}: no data.pkl inside; not a PyTorch checkpoint")
        prefix = pickles[0].rsplit("/", 1)[0] if "/" in pickles[0] else ""
        with archive.open(pickles[0]) as f:
            try:
                return _RestrictedUnpickler(f, archive, prefix, path).load()
            except CheckpointError:
                raise
            except Exception as err:  # corrupt pickle: report, do not trace back
                raise CheckpointError(f"{path}: unreadable checkpoint ({err})") from None


# ----------------------------------------------------------------------------- MindSpore .ckpt


def read_ckpt(path):
    """Read a MindSpore .ckpt into ``{name: array}``; non-tensor entries keep their python value."""
    import mindspore as ms

    try:
        raw = ms.load_checkpoint(path)
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable MindSpore checkpoint ({err})") from None
    return OrderedDict((k, _to_numpy(v)) for k, v in raw.items())


def save_ckpt(state, path, extra=None):
    """Write ``{name: array or Tensor}`` (plus scalar/str ``extra`` entries) as .ckpt, atomically."""
    import mindspore as ms

    entries = [{"name": k, "data": to_tensor(v)} for k, v in state.items()]
    _atomic_write(path, lambda tmp: ms.save_checkpoint(entries, tmp, append_dict=extra or None),
                  by_name=True)


# ----------------------------------------------------------------------------- dispatch


def _shard_files(index_path):
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map", {})
    folder = os.path.dirname(index_path)
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise CheckpointError(f"{index_path} lists shards that are missing: {', '.join(missing[:3])}")
    return [os.path.join(folder, f) for f in files]


def find_weight_files(path):
    """The weight file(s) a path stands for: itself, an index's shards, or a folder's weights."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    if os.path.isfile(path):
        return _shard_files(path) if path.endswith(".index.json") else [path]
    for pattern in ("*.safetensors.index.json", "*.safetensors", "*.bin.index.json", "*.bin",
                    "*.ckpt", "*.pth", "*.pt"):
        found = sorted(glob.glob(os.path.join(path, pattern)))
        if found:
            return _shard_files(found[0]) if pattern.endswith(".index.json") else found[:1]
    raise CheckpointError(f"no weights in folder {path} (expected *.safetensors, *.bin, *.ckpt or *.pth)")


def read_state_dict(path, copy_on_write=False):
    """Read any supported weights source into one flat ``{name: array}`` dict.

    A ``.pth`` holding ``{"state_dict": ...}`` is returned as is (a nested dict); use
    ``unwrap_state_dict`` to pick the sub-dict. ``copy_on_write``: safetensors arrays are
    writable private maps of the file, which ``load_into_cell(..., adopt=True)`` takes without a copy.
    """
    state = OrderedDict()
    for file in find_weight_files(path):
        suffix = os.path.splitext(file)[1]
        if suffix == ".safetensors":
            part = read_safetensors(file, copy_on_write=copy_on_write)
        elif suffix == ".ckpt":
            part = read_ckpt(file)
        elif suffix in (".pth", ".pt", ".bin"):
            part = read_torch_pickle(file)
        else:
            raise CheckpointError(f"{file}: unknown weights format {suffix!r} (use {', '.join(WEIGHT_SUFFIXES)})")
        if not isinstance(part, dict):
            raise CheckpointError(f"{file}: expected a dict of tensors, found {type(part).__name__}")
        state.update(part)
    return state


# Where training checkpoints keep their weights: the official PixArt save_checkpoint writes
# {"state_dict", "state_dict_ema" (when an EMA model is kept), "optimizer", "scheduler", "epoch"}.
EMA_KEYS = ("state_dict_ema", "ema")
MODEL_KEYS = ("state_dict", "model", "module")
_EMA_PREFIX = "ema."  # this project's training checkpoints (pixart/train/checkpointing.py)


def unwrap_state_dict(obj, use_ema=False, source="checkpoint"):
    """Pick the tensors out of a training checkpoint.

    ``use_ema=False``: ``obj["state_dict"]`` (or ``model`` / ``module``), else ``obj`` itself.
    ``use_ema=True``: ``obj["state_dict_ema"]`` (official PixArt training) or ``obj["ema"]``, or
    the ``ema.*`` tensors of a flat checkpoint; a checkpoint without EMA weights is a
    CheckpointError naming the keys it has, never a silent fall-back to the trained weights.
    """
    if use_ema:
        for key in EMA_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
        flat = {k[len(_EMA_PREFIX):]: v for k, v in obj.items() if k.startswith(_EMA_PREFIX)}
        if flat:
            return flat
        keys = list(obj)
        shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} keys)" if len(keys) > 6 else "")
        raise CheckpointError(f"{source} has no EMA weights (no 'state_dict_ema' or 'ema' entry); it holds: "
                              f"{shown}. Drop --use_ema to load its trained weights")
    for key in MODEL_KEYS:
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def load_into_cell(cell, state, source="checkpoint", strict=True, adopt=False):
    """Copy ``state`` into the cell's parameters by name, casting to each parameter's dtype.

    Missing, unexpected or mis-shaped tensors raise one CheckpointError that lists them, so a
    wrong file never loads partially. With ``strict=False`` only the names present in both are
    loaded (for adapters and partial state) and the lists are returned instead. ``adopt``: the
    caller hands the arrays over (a state dict it made for this cell alone, e.g. read with
    ``copy_on_write``): writable arrays of the parameter's dtype become its storage, uncopied.
    """
    params = OrderedDict(cell.parameters_and_names())
    missing = [k for k in params if k not in state]
    unexpected = [k for k in state if k not in params]
    mismatched = [f"{k} {tuple(np.shape(state[k]))} vs model {tuple(params[k].shape)}"
                  for k in params if k in state and tuple(np.shape(state[k])) != tuple(params[k].shape)]
    if mismatched or (strict and (missing or unexpected)):
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
            if names:
                shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
                parts.append(f"{len(names)} {label} ({shown})")
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))
    for name, param in params.items():
        if name in state:
            param.set_data(to_tensor(state[name], param.dtype, adopt=adopt))
    return missing, unexpected


# ----------------------------------------------------------------------------- helpers


def _to_numpy(value):
    """Tensor/Parameter -> numpy (bf16 kept as ml_dtypes.bfloat16); other values unchanged."""
    import mindspore as ms

    if isinstance(value, ms.Tensor):
        if value.dtype == ms.bfloat16:
            return value.astype(ms.float32).asnumpy().astype(ml_dtypes.bfloat16)
        return value.asnumpy()
    return value


def _numpy_dtype(dtype):
    """MindSpore float dtype -> numpy dtype (None for others)."""
    import mindspore as ms

    return {ms.float32: np.dtype(np.float32), ms.float16: np.dtype(np.float16),
            ms.bfloat16: np.dtype(ml_dtypes.bfloat16)}.get(dtype)


def to_tensor(value, dtype=None, adopt=False):
    """numpy array (bf16 included) or Tensor -> MindSpore Tensor of ``dtype`` (default: its own).

    A copy, unless ``adopt`` and the array is writable, C-contiguous and of that dtype: then the
    tensor uses the array's memory (the caller must not use the array afterwards).
    """
    import mindspore as ms

    if isinstance(value, ms.Tensor):
        return value if dtype is None or value.dtype == dtype else value.astype(dtype)
    private_view = getattr(value, "private_view", None)  # a lazily mapped file tensor of this dtype: no copy
    if private_view is not None and (dtype is None or _numpy_dtype(dtype) == value.dtype):
        return ms.from_numpy(private_view())
    arr = np.asarray(value)
    if arr.dtype == ml_dtypes.bfloat16:
        if dtype in (None, ms.bfloat16):  # MindSpore takes ml_dtypes' bf16 as is: no fp32 round trip
            return ms.Tensor(np.ascontiguousarray(arr))
        return ms.Tensor(arr.astype(np.float32), dtype=dtype)
    if dtype is None or _numpy_dtype(dtype) == arr.dtype:
        if adopt and arr.flags.writeable and arr.flags.c_contiguous:
            return ms.from_numpy(arr)
        # A copy, so a state dict loaded twice never aliases; numpy's copy + from_numpy is ~10x
        # faster than ms.Tensor(array) on a mapped file.
        return ms.from_numpy(np.array(arr, order="C"))
    if dtype == ms.bfloat16:
        return ms.Tensor(arr.astype(np.float32), dtype=ms.bfloat16)
    return ms.Tensor(np.ascontiguousarray(arr), dtype=dtype)


def _atomic_write(path, write, by_name=False):
    """Write via a temporary file in the same folder, then rename over ``path``.

    ``write`` takes an open binary file, or the temporary path when ``by_name`` is set. The data is
    fsynced before the rename and the folder after it: after a power loss the name points either
    to the old file or to the complete new one, never to an empty or partial one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp" + suffix, dir=folder)
    try:
        if by_name:
            os.close(fd)
            write(tmp)
            _fsync_path(tmp, os.O_RDONLY)
        else:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # makes the rename itself durable
            _fsync_path(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems without directory fsync
                raise
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
