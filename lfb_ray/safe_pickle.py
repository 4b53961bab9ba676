"""A restricted unpickler for files from the internet (AVA proposals, banks, checkpoints' extras).

Only numpy arrays/scalars/dtypes and plain builtins can be rebuilt; any other global (`os.system`,
`builtins.eval`, arbitrary classes) is refused before anything is called.

Arrays are bounded too: an array's header declares its shape and dtype, and numpy allocates what it
declares (`_reconstruct(ndarray, shape, dtype)`, `ndarray(shape, dtype)`, and `ndarray.__setstate__`
of an object array, whose elements need not be in the file), so a pickle of a few hundred bytes could
ask for terabytes. Every array's declared size is checked against a per-array and a per-load limit
before numpy sees it (`safe_load`'s `max_array_bytes`, `max_bytes`).
"""

from __future__ import annotations

import codecs
import collections
import io
import math
import os
import pickle
from typing import IO, Any

import numpy as np

from lfb_ray.redaction import RedactedMessage, redact_text

__all__ = ["DEFAULT_MAX_ARRAY_BYTES", "DEFAULT_MAX_BYTES", "UnsafePickleError", "safe_load"]

# The defaults fit the largest real pickles of AVA work with room to spare: FAIR's proposal pickles
# are 100-300 MB in all, of small per-keyframe arrays; mmaction2's lfb_*.pkl feature banks are 1-3
# GB in fp16/fp32, at most that in one array when a bank is stacked. 4 GiB per array and 8 GiB per
# load take both, yet refuse the terabytes a crafted header can declare. Callers that know better
# pass their own (`safe_load(..., max_bytes=...)`).
DEFAULT_MAX_ARRAY_BYTES = 4 << 30
DEFAULT_MAX_BYTES = 8 << 30


class UnsafePickleError(RedactedMessage, ValueError):
    """The pickle is malformed or references a global outside the allow-list.

    `lfb_ray.data.annotations.AnnotationError` callers see it re-raised as an AnnotationError.
    """


def _numpy_attr(submodule: str, name: str) -> Any:
    """Looks up `numpy._core.<sub>.<name>` (numpy 2) or `numpy.core.<sub>.<name>` (numpy 1).

    Resolving ourselves avoids importing the deprecated `numpy.core` alias under numpy 2.
    """
    import importlib

    for prefix in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{prefix}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise UnsafePickleError(f"numpy has no {submodule}.{name}")


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` restricted to what numpy emits: `encode(str, "latin1")` for byte payloads."""
    if not isinstance(obj, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickleError(f"refused _codecs.encode({type(obj).__name__}, {encoding!r})")
    return codecs.encode(obj, "latin1", errors)


def _byte_string(cls: type) -> Any:
    """`bytes`/`bytearray` restricted to copying bytes (no `bytes(10**12)` allocations)."""

    def build(*args: Any) -> Any:
        if not args:
            return cls()
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            return cls(args[0])
        raise UnsafePickleError(f"refused {cls.__name__}() with arguments of type "
                                f"{[type(a).__name__ for a in args]}")

    return build


# (module, name) -> how to get the object. Python 2 pickles name builtins `__builtin__`.
_NUMPY_ALLOWED = {
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),  # protocol-5 pickles of contiguous arrays
}
_PLAIN_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytes"): _byte_string(bytes),
    ("builtins", "bytearray"): _byte_string(bytearray),
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("__builtin__", "complex"): complex,
    ("__builtin__", "bytes"): _byte_string(bytes),
    ("__builtin__", "bytearray"): _byte_string(bytearray),
    ("collections", "OrderedDict"): collections.OrderedDict,
}


def _fmt_bytes(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


class _ArrayBudget:
    """The array limits of one load: `check` refuses an array by its declared shape and dtype, before
    numpy allocates it, and counts what it admits against the load's total."""

    def __init__(self, source: str, max_array_bytes: int, max_bytes: int) -> None:
        self.source, self.max_array_bytes, self.max_bytes = source, max_array_bytes, max_bytes
        self.total = 0

    def check(self, shape: Any, dtype: Any) -> None:
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        if not isinstance(shape, (tuple, list)) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise UnsafePickleError(f"{self.source}: refused an array with shape {shape!r} "
                                    "(not a tuple of non-negative ints)")
        try:
            dt = np.dtype(dtype)
        except Exception as e:
            raise UnsafePickleError(f"{self.source}: refused an array of dtype {dtype!r}: {e}") from None
        nbytes = math.prod(shape) * max(dt.itemsize, 1)  # Python ints: no overflow
        what = f"an array of declared shape {tuple(shape)} and dtype {dt} ({_fmt_bytes(nbytes)})"
        if nbytes > self.max_array_bytes:
            raise UnsafePickleError(f"{self.source}: refused {what}: over the limit of "
                                    f"{_fmt_bytes(self.max_array_bytes)} per array (max_array_bytes); "
                                    "nothing was allocated")
        if self.total + nbytes > self.max_bytes:
            raise UnsafePickleError(f"{self.source}: refused {what}: the arrays would take "
                                    f"{_fmt_bytes(self.total + nbytes)}, over the limit of "
                                    f"{_fmt_bytes(self.max_bytes)} per load (max_bytes); nothing was allocated")
        self.total += nbytes


def _checked_array_type(budget: _ArrayBudget) -> type:
    """An `np.ndarray` subclass, for one load, that stands for `numpy.ndarray` in the pickle: its
    construction (`ndarray(shape, dtype)`, `_reconstruct`) and its `__setstate__` (the BUILD of
    every pickled array) check the declared shape and dtype first. `_plain` turns the loaded arrays
    back into `np.ndarray` (views: no copy)."""

    class _CheckedArray(np.ndarray):
        def __new__(cls, shape, dtype=float, *args, **kwargs):
            budget.check(shape, dtype)
            return np.ndarray.__new__(cls, shape, dtype, *args, **kwargs)

        def __setstate__(self, state):
            # (version, shape, dtype, is_fortran, data) or, from old pickles, without the version.
            if not isinstance(state, tuple) or len(state) not in (4, 5):
                raise UnsafePickleError(f"{budget.source}: refused an array state of type {type(state).__name__}")
            # What `_reconstruct` or `__new__` already counted is replaced by the declared size.
            budget.total -= self.nbytes
            budget.check(state[-4], state[-3])
            return np.ndarray.__setstate__(self, state)

        def __reduce__(self):  # never pickled as itself
            return self.view(np.ndarray).__reduce__()

    return _CheckedArray


def _plain(obj: Any, checked: type, seen: dict[int, Any] | None = None) -> Any:
    """`obj` with every `checked` array replaced by its `np.ndarray` view, in place inside lists and
    dicts, tuples rebuilt; shared and cyclic containers stay shared."""
    if seen is None:
        seen = {}
    if isinstance(obj, np.ndarray):
        return obj.view(np.ndarray) if isinstance(obj, checked) else obj
    if not isinstance(obj, (list, dict, tuple)) or not obj:
        return obj
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, list):
        seen[id(obj)] = obj
        for i, v in enumerate(obj):
            obj[i] = _plain(v, checked, seen)
        return obj
    if isinstance(obj, dict):
        seen[id(obj)] = obj
        for k, v in obj.items():
            new = _plain(v, checked, seen)
            if new is not v:
                obj[k] = new
        return obj
    seen[id(obj)] = obj  # a tuple that (indirectly) holds itself stays as it is
    items = [_plain(v, checked, seen) for v in obj]
    out = obj if all(a is b for a, b in zip(items, obj)) else tuple(items)
    seen[id(obj)] = out
    return out


class _RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` admits only the allow-list above, and whose arrays are
    checked against `budget` before they are allocated (`_checked_array_type`)."""

    def __init__(self, file: IO[bytes], source: str, budget: _ArrayBudget) -> None:
        # latin1 decodes Python-2 `str` payloads (FAIR's proposal pickles are Python 2).
        super().__init__(file, encoding="latin1")
        self._source = source
        self._budget = budget
        self.array_type = _checked_array_type(budget)

    def _numpy(self, sub: str, name: str) -> Any:
        fn = _numpy_attr(sub, name)
        budget, array_type = self._budget, self.array_type
        if name == "_reconstruct":
            def reconstruct(subtype, shape, dtype):
                if subtype is not array_type:  # only numpy.ndarray (as found above) is rebuilt
                    raise UnsafePickleError(f"{self._source}: refused _reconstruct of {subtype!r}")
                budget.check(shape, dtype)
                return fn(subtype, shape, dtype)
            return reconstruct
        if name == "_frombuffer":
            def frombuffer(buf, dtype, shape, order):
                budget.check(shape, dtype)
                # A view of our type: a BUILD on it then goes through the checked __setstate__.
                return fn(buf, dtype, shape, order).view(array_type)
            return frombuffer
        return fn

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("numpy", "ndarray"):
            return self.array_type
        if (module, name) in _PLAIN_ALLOWED:
            return _PLAIN_ALLOWED[(module, name)]
        for prefix in ("numpy._core.", "numpy.core."):
            if module.startswith(prefix) and (module[len(prefix):], name) in _NUMPY_ALLOWED:
                return self._numpy(module[len(prefix):], name)
        raise UnsafePickleError(
            f"{self._source}: refused to unpickle global '{module}.{name}' "
            "(only numpy arrays and plain builtins are allowed); nothing was executed")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refused persistent id {pid!r}")


def safe_load(fileobj_or_path: str | os.PathLike | IO[bytes], *, what: str,
              max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Unpickles numpy arrays, numbers, strings and containers; refuses everything else.

    Args:
        fileobj_or_path: a path or a binary file object.
        what: what the file holds, for error messages (e.g. "proposals").
        max_array_bytes: the most one array may declare (shape x itemsize), checked before it is
            allocated (`DEFAULT_MAX_ARRAY_BYTES`: see there why).
        max_bytes: the most all the arrays of this load may declare together (`DEFAULT_MAX_BYTES`).

    Returns:
        The unpickled object (dicts, lists, tuples, str, numbers, numpy arrays/scalars).

    Raises:
        UnsafePickleError: a refused global, an array over the limits, or a corrupt/truncated
            pickle. The message names `what`, the file and (for refusals) the global as
            `module.name`, or the array's declared shape and dtype and the limit.
        OSError: the file cannot be opened.
    """
    if isinstance(fileobj_or_path, (str, os.PathLike)):
        source = redact_text(f"{what} file {os.fspath(fileobj_or_path)}")
        with open(fileobj_or_path, "rb") as f:
            return _load(f, source, max_array_bytes, max_bytes)
    source = redact_text(f"{what} file {getattr(fileobj_or_path, 'name', '<stream>')}")
    return _load(fileobj_or_path, source, max_array_bytes, max_bytes)


def _load(f: IO[bytes], source: str, max_array_bytes: int, max_bytes: int) -> Any:
    try:
        unpickler = _RestrictedUnpickler(f, source, _ArrayBudget(source, max_array_bytes, max_bytes))
        return _plain(unpickler.load(), unpickler.array_type)
    except UnsafePickleError as e:
        if str(e).startswith(source):
            raise
        raise UnsafePickleError(f"{source}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, io.UnsupportedOperation, UnicodeDecodeError, MemoryError) as e:
        raise UnsafePickleError(f"{source}: not a valid pickle ({type(e).__name__}: {e})") from None
