"""Reading files a user can swap (checkpoints, data caches) without unpickling arbitrary objects.

Every file the program reads back is either JSON/text, raw tensor bytes, or a pickle. A pickle
can name any importable callable and call it while loading (``os.system``, ...), so a
checkpoint downloaded from elsewhere or a swapped data cache could run code. Here all of them
are read inside :func:`restricted_loading`, whose refusals are :class:`UnsafeFileError`:

- ``torch.load`` (megatron's ``common.pt``, the objects stored inside ``*.distcp`` files —
  RNG states, distributed-optimizer shards —, DeepSpeed's ``*.pt`` files) runs with
  ``weights_only=True``, whatever the caller asked for, plus numeric numpy arrays (the numpy
  RNG state) and the callers' own plain-data classes (:data:`NUMPY_ARRAYS`, ``extra_globals``);
- ``pickle.load`` (the ``.metadata`` index torch.distributed.checkpoint writes with
  ``pickle.dump``) is :class:`RestrictedUnpickler`: torch sizes, dtypes and the dataclasses
  and enums of torch.distributed.checkpoint's metadata only;
- ``numpy.load`` (megatron-core's dataset index caches, ``*.npy``) runs with
  ``allow_pickle=False``: an index is a plain integer array.

The three are patched process-wide for the duration of the block rather than in the modules
that call them, so the guarantee does not depend on where megatron-core, torch or DeepSpeed
read a file in a given version. :func:`check_torch_file` and :func:`check_dist_checkpoint`
examine files without loading them, so that a bad checkpoint is reported before any work.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import importlib
import io
import json
import os
import pickle
import re
import threading
from typing import Iterator, Sequence

import numpy
import torch

# What torch.load may build besides torch's own weights-only allow-list: numeric numpy arrays
# (numpy's RNG state is one); an object array's elements would still go through this unpickler.
NUMPY_ARRAYS = ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
                "numpy.dtype")
_NUMERIC_DTYPES = ("?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")
# The only megatron dist_checkpointing backends this program writes (``metadata.json``), per key: the
# accepted values, the first the expected one. megatron-core >= 0.17 records no ``common_backend`` (its
# ``common.pt`` is always torch's), so that key may be absent.
DIST_CHECKPOINT_BACKENDS = {"sharded_backend": ("torch_dist",), "common_backend": ("torch", None)}
_DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                         "torch.distributed.checkpoint.filesystem")


class UnsafeFileError(ValueError):
    """A file was not loaded: it refers to objects that are not plain data, or is not in the expected
    format. The message names the file and the reason."""


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _torch_safe_globals(extra_globals: Sequence[str]) -> list:
    """``torch.serialization.safe_globals`` entries for :data:`NUMPY_ARRAYS` + ``extra_globals`` (dotted names)."""
    reconstruct = numpy.ndarray.__reduce__(numpy.zeros(0))[0]  # numpy 2: numpy._core..., 1.x: numpy.core...
    entries = [(reconstruct, dotted) for dotted in NUMPY_ARRAYS if dotted.endswith("._reconstruct")]
    entries += [numpy.ndarray, numpy.dtype] + [type(numpy.dtype(code)) for code in _NUMERIC_DTYPES]
    return entries + [(obj, dotted) for dotted in extra_globals if (obj := _resolve(dotted)) is not None]


def _allowed_metadata_global(module: str, name: str):
    """The object a torch.distributed.checkpoint ``.metadata`` file may reference, or ``None``.

    ``torch.Size``, torch dtypes / layouts / memory formats, torch's layout decoder,
    ``collections.OrderedDict``, ``pathlib.PosixPath`` (the checkpoint id torch records), and the
    dataclasses and enums of torch's distributed-checkpoint metadata (megatron's own additions are
    plain dicts). None of them runs code beyond building data.
    """
    if (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                          ("pathlib", "PosixPath")}:
        return getattr(importlib.import_module(module), name)
    if module == "torch":
        value = getattr(torch, name, None)
        return value if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)) else None
    if module in _DCP_METADATA_MODULES:
        value = getattr(importlib.import_module(module), name, None)
        is_data = isinstance(value, type) and (issubclass(value, enum.Enum) or hasattr(value, "__dataclass_fields__"))
        return value if is_data else None
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :func:`_allowed_metadata_global` objects."""

    def find_class(self, module: str, name: str):
        value = _allowed_metadata_global(module, name)
        if value is None:
            raise UnsafeFileError(f"it references {module}.{name}, which is not checkpoint metadata")
        return value


class _Refusals(threading.local):
    """The refusals of the current :func:`restricted_loading` block (deep callers may swallow or wrap them)."""

    def __init__(self):
        self.depth = 0
        self.first: str | None = None


_refusals = _Refusals()
_lock = threading.Lock()


def _refuse(what: str, reason: str) -> UnsafeFileError:
    message = (f"refusing to load {what}: {reason}; loading it could run arbitrary code (the file is corrupt or "
               f"malicious). Nothing from it was used.")
    if _refusals.first is None:
        _refusals.first = message
    return UnsafeFileError(message)


def _where(file, what: str) -> str:
    """``file`` (a path, an open file or an in-memory buffer) as read while reading ``what``."""
    name = file if isinstance(file, (str, os.PathLike)) else getattr(file, "name", None)
    return f"{name} ({what})" if name is not None else f"an object stored in {what}"


def _weights_only_reason(err: Exception) -> str:
    """The gist of torch's long weights-only error (the offending global, or its last line)."""
    text = str(err)
    found = re.search(r"GLOBAL (\S+)", text) or re.search(r"but got (<[^>]+>)", text)
    if found:
        return f"it references {found.group(1)}, which is not plain tensor data"
    lines = [line for line in text.splitlines() if line.strip() and "documentation" not in line]
    return lines[-1] if lines else type(err).__name__


def _patched_loaders(what: str, extra_globals: Sequence[str]):
    torch_load, pickle_load, numpy_load = torch.load, pickle.load, numpy.load
    safe_globals = _torch_safe_globals(extra_globals)

    @functools.wraps(torch_load)
    def load_weights_only(f, *args, **kwargs):
        kwargs.pop("pickle_module", None)
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(safe_globals):
                return torch_load(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            raise _refuse(_where(f, what), _weights_only_reason(err)) from None

    def restricted_pickle_load(file, **kwargs):
        try:
            return RestrictedUnpickler(file, **kwargs).load()
        except UnsafeFileError as err:
            raise _refuse(_where(file, what), str(err)) from None

    @functools.wraps(numpy_load)
    def load_without_pickles(file, *args, **kwargs):
        kwargs["allow_pickle"] = False
        try:
            return numpy_load(file, *args, **kwargs)
        except ValueError as err:
            if "pickle" not in str(err) and "Python objects" not in str(err):
                raise
            raise _refuse(_where(file, what), "it holds pickled Python objects, not a plain array") from None

    return (torch, "load", load_weights_only), (pickle, "load", restricted_pickle_load), \
        (numpy, "load", load_without_pickles)


@contextlib.contextmanager
def restricted_loading(what: str, extra_globals: Sequence[str] = ()) -> Iterator[None]:
    """Within the block, ``torch.load``, ``pickle.load`` and ``numpy.load`` refuse anything but plain data.

    Args:
        what: what is being read, for messages (e.g. ``"checkpoint ckpt/iter_0000100"``).
        extra_globals: dotted names of further plain-data classes ``torch.load`` may build
            (e.g. DeepSpeed's loss-scaler state).
    Raises:
        UnsafeFileError: when a file was refused, even if a library in between caught the
            refusal and raised something else (torch.distributed.checkpoint gathers per-rank
            failures into one exception).

    Nested blocks keep the outermost one's patches. Meant for the main thread: while the block
    runs, every thread of the process loads under the same restrictions.
    """
    from megatron.core.msc_utils import MultiStorageClientFeature

    if MultiStorageClientFeature.is_enabled():  # its readers bypass torch.load / pickle.load
        raise UnsafeFileError(f"cannot read {what} safely: megatron's multi-storage client is enabled; disable it")
    if _refusals.depth:
        _refusals.depth += 1
        try:
            yield
        finally:
            _refusals.depth -= 1
        return
    with _lock:
        patches = _patched_loaders(what, extra_globals)
        saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
        for owner, attr, replacement in patches:
            setattr(owner, attr, replacement)
        _refusals.depth, _refusals.first = 1, None
        try:
            yield
        except BaseException as err:  # torch.distributed.checkpoint's CheckpointException is a BaseException
            if _refusals.first is not None and not isinstance(err, UnsafeFileError):
                raise UnsafeFileError(_refusals.first) from None
            remote = _remote_refusal(err)
            if remote is not None:
                raise remote from None
            raise
        else:
            if _refusals.first is not None:  # a library caught the refusal and carried on without the data
                raise UnsafeFileError(_refusals.first)
        finally:
            for owner, attr, original in saved:
                setattr(owner, attr, original)
            _refusals.depth = 0


def _remote_refusal(err: BaseException) -> UnsafeFileError | None:
    """The :class:`UnsafeFileError` another rank raised inside ``err`` (torch.distributed.checkpoint
    re-raises every rank's failures on all ranks as one ``CheckpointException``), if any."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, UnsafeFileError):
                return UnsafeFileError(str(inner))
    return None


def check_torch_file(path: str, extra_globals: Sequence[str] = ()) -> None:
    """Refuse (:class:`UnsafeFileError`) a ``torch.save`` file naming objects a weights-only load would not
    build, without loading it (only its small pickle record is read)."""
    allowed = {*NUMPY_ARRAYS, *extra_globals}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, pickle.UnpicklingError) as err:  # not a torch.save zip file
        raise UnsafeFileError(f"refusing to load {path}: it is not a file written by torch.save ({err})") from None
    unsafe = sorted(set(found) - allowed)
    if unsafe:
        raise UnsafeFileError(f"refusing to load {path}: it references {', '.join(unsafe)}, which is not plain "
                              f"tensor data; loading it could run arbitrary code (the file is corrupt or malicious)")


def check_dist_checkpoint(path: str) -> None:
    """Examine a megatron ``dist_checkpointing`` directory before loading anything from it.

    ``metadata.json`` must name the backends this program writes (:data:`DIST_CHECKPOINT_BACKENDS`),
    ``common.pt`` may hold plain data only and the ``.metadata`` index only checkpoint metadata.
    Raises :class:`UnsafeFileError`. The objects inside ``*.distcp`` files are checked as they load.
    """
    try:
        with open(os.path.join(path, "metadata.json")) as f:
            backends = json.load(f)
    except (OSError, ValueError) as err:
        raise UnsafeFileError(f"cannot read {os.path.join(path, 'metadata.json')}: {err}") from None
    for key, accepted in DIST_CHECKPOINT_BACKENDS.items():
        if not isinstance(backends, dict) or backends.get(key) not in accepted:
            raise UnsafeFileError(f"{os.path.join(path, 'metadata.json')}: {key} must be {accepted[0]!r} (what this "
                                  f"program writes), found {backends.get(key) if isinstance(backends, dict) else backends!r}")
    common = os.path.join(path, "common.pt")
    if os.path.exists(common):
        check_torch_file(common)
    index = os.path.join(path, ".metadata")
    try:
        with open(index, "rb") as f:
            RestrictedUnpickler(io.BytesIO(f.read())).load()
    except UnsafeFileError as err:
        raise UnsafeFileError(f"refusing to load {index}: {err}; loading it could run arbitrary code (the file is "
                              f"corrupt or malicious)") from None
    except Exception as err:  # missing, truncated or not a pickle at all
        raise UnsafeFileError(f"cannot read {index}: {type(err).__name__}: {err}") from None
