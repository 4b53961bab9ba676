"""A restricted unpickler for files from the internet (AVA proposals, banks, checkpoints' extras).

Only numpy arrays/scalars/dtypes and plain builtins can be rebuilt; any other global (`os.system`,
`builtins.eval`, arbitrary classes) is refused before anything is called.
"""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
from typing import IO, Any

import numpy as np

__all__ = ["UnsafePickleError", "safe_load"]


class UnsafePickleError(ValueError):
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
    ("numpy", "ndarray"): np.ndarray,
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


class _RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` admits only the allow-list above."""

    def __init__(self, file: IO[bytes], source: str) -> None:
        # latin1 decodes Python-2 `str` payloads (FAIR's proposal pickles are Python 2).
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN_ALLOWED:
            return _PLAIN_ALLOWED[(module, name)]
        for prefix in ("numpy._core.", "numpy.core."):
            if module.startswith(prefix) and (module[len(prefix):], name) in _NUMPY_ALLOWED:
                return _numpy_attr(module[len(prefix):], name)
        raise UnsafePickleError(
            f"{self._source}: refused to unpickle global '{module}.{name}' "
            "(only numpy arrays and plain builtins are allowed); nothing was executed")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refused persistent id {pid!r}")


def safe_load(fileobj_or_path: str | os.PathLike | IO[bytes], *, what: str) -> Any:
    """Unpickles numpy arrays, numbers, strings and containers; refuses everything else.

    Args:
        fileobj_or_path: a path or a binary file object.
        what: what the file holds, for error messages (e.g. "proposals").

    Returns:
        The unpickled object (dicts, lists, tuples, str, numbers, numpy arrays/scalars).

    Raises:
        UnsafePickleError: a refused global, or a corrupt/truncated pickle. The message names
            `what`, the file and (for refusals) the global as `module.name`.
        OSError: the file cannot be opened.
    """
    if isinstance(fileobj_or_path, (str, os.PathLike)):
        source = f"{what} file {os.fspath(fileobj_or_path)}"
        with open(fileobj_or_path, "rb") as f:
            return _load(f, source)
    source = f"{what} file {getattr(fileobj_or_path, 'name', '<stream>')}"
    return _load(fileobj_or_path, source)


def _load(f: IO[bytes], source: str) -> Any:
    try:
        return _RestrictedUnpickler(f, source).load()
    except UnsafePickleError as e:
        if str(e).startswith(source):
            raise
        raise UnsafePickleError(f"{source}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, io.UnsupportedOperation, UnicodeDecodeError, MemoryError) as e:
        raise UnsafePickleError(f"{source}: not a valid pickle ({type(e).__name__}: {e})") from None
