"""Restricted unpickler: numpy arrays and builtins load; anything executable is refused unexecuted."""

from __future__ import annotations

import collections
import io
import os
import pickle
import subprocess

import numpy as np
import pytest

from lfb_ray.safe_pickle import UnsafePickleError, safe_load


class _Hostile:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


class _CallsPopen:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", self.marker],))


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_and_builtins_roundtrip(tmp_path, protocol):
    obj = {
        "v,0902": np.arange(10, dtype=np.float32).reshape(2, 5),
        "ints": np.array([1, 2, 3], np.int64),
        "scalar": np.float64(0.5),
        "nested": [1, 2.5, "x", (3, None), {True, False}, frozenset({1}), b"bytes", 1j],
        "ordered": collections.OrderedDict(a=1),
        "non_contiguous": np.arange(12.0).reshape(3, 4)[:, ::2],
    }
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    out = safe_load(path, what="test")
    assert set(out) == set(obj)
    np.testing.assert_array_equal(out["v,0902"], obj["v,0902"])
    assert out["v,0902"].dtype == np.float32
    np.testing.assert_array_equal(out["non_contiguous"], obj["non_contiguous"])
    assert out["scalar"] == 0.5 and out["nested"] == obj["nested"] and out["ordered"] == obj["ordered"]


def test_file_object_is_accepted():
    buf = io.BytesIO(pickle.dumps([np.ones(3)], protocol=2))
    np.testing.assert_array_equal(safe_load(buf, what="test")[0], np.ones(3))


def test_os_system_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"v,0902": _Hostile(str(marker))}, protocol=2))
    with pytest.raises(UnsafePickleError) as exc:
        safe_load(path, what="proposals")
    msg = str(exc.value)
    assert "system" in msg and str(path) in msg and "proposals" in msg
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_eval_and_popen_are_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    # Protocols < 3 spell builtins "__builtin__" (Python 2 names).
    for obj, pattern in ((_CallsEval(), r"'(__)?builtins?(__)?\.eval'"), (_CallsPopen(str(marker)), r"(subprocess|commands)\.Popen'")):
        path = tmp_path / "evil.pkl"
        path.write_bytes(pickle.dumps([obj], protocol=protocol))
        with pytest.raises(UnsafePickleError, match=pattern):
            safe_load(path, what="bank")
    assert not marker.exists()


def test_arbitrary_class_is_refused(tmp_path):
    path = tmp_path / "cls.pkl"
    path.write_bytes(pickle.dumps(collections.Counter(a=1)))
    with pytest.raises(UnsafePickleError, match="collections.Counter"):
        safe_load(path, what="test")


def test_codecs_encode_only_latin1():
    # GLOBAL _codecs encode; args ("abc", "rot13"); REDUCE; STOP
    data = b"c_codecs\nencode\n(Vabc\nVrot13\ntR."
    with pytest.raises(UnsafePickleError, match="rot13"):
        safe_load(io.BytesIO(data), what="test")


def test_truncated_and_garbage_raise_clean_errors(tmp_path):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps({"a": np.ones(4)})[:-7])
    with pytest.raises(UnsafePickleError, match="not a valid pickle"):
        safe_load(path, what="test")
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(UnsafePickleError):
        safe_load(path, what="test")


def test_bytes_constructor_cannot_allocate():
    # GLOBAL __builtin__ bytes; args (10**9,); REDUCE; STOP
    data = b"c__builtin__\nbytes\n(I1000000000\ntR."
    with pytest.raises(UnsafePickleError, match="refused bytes"):
        safe_load(io.BytesIO(data), what="test")
    assert safe_load(io.BytesIO(pickle.dumps([b"", bytearray(b"ab")], protocol=2)), what="test") == [b"", bytearray(b"ab")]


# --- array limits: a header may declare any size; it is refused before numpy allocates it

def _reconstruct_fn():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _HugeReconstruct:
    """`_reconstruct(ndarray, shape, dtype)`: numpy allocates the declared shape at once."""

    def __init__(self, shape, dtype=b"b"):
        self.shape, self.dtype = shape, dtype

    def __reduce__(self):
        return (_reconstruct_fn(), (np.ndarray, self.shape, self.dtype))


class _HugeObjectState:
    """An empty array whose BUILD state declares an object array of `n` elements and holds none:
    `ndarray.__setstate__` allocates (and fills) all of them."""

    def __init__(self, n):
        self.n = n

    def __reduce__(self):
        return (_reconstruct_fn(), (np.ndarray, (0,), b"b"), (1, (self.n,), np.dtype(object), False, []))


class _HugeNew:
    """`ndarray(shape, dtype)` through REDUCE."""

    def __reduce__(self):
        return (np.ndarray, ((1 << 20, 1 << 20), np.dtype(np.float64)))


def _refused_quickly(path, **limits):
    import resource
    import time

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    with pytest.raises(UnsafePickleError) as e:
        safe_load(path, what="proposals", **limits)
    assert time.perf_counter() - t0 < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 100 * 1024  # < 100 MiB more
    return str(e.value)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_huge_declared_array_is_refused_before_allocating(tmp_path, protocol):
    cases = {"reconstruct": _HugeReconstruct((1 << 20, 1 << 20)), "object_state": _HugeObjectState(1 << 30),
             "new": _HugeNew()}
    for name, obj in cases.items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(pickle.dumps({"v,0902": obj}, protocol=protocol))
        assert path.stat().st_size < 1000  # a tiny file...
        msg = _refused_quickly(path)  # ...that declares terabytes / 8 GiB
        assert str(path) in msg and "proposals" in msg, msg
        assert "declared shape" in msg and "per array" in msg and "4.00 GiB" in msg, msg


def test_array_limit_message_names_shape_dtype_and_limit(tmp_path):
    path = tmp_path / "obj.pkl"
    path.write_bytes(pickle.dumps(_HugeObjectState(1 << 30), protocol=2))
    msg = _refused_quickly(path)
    assert "declared shape (1073741824,) and dtype object" in msg and "4.00 GiB per array" in msg, msg


def test_limits_per_array_and_per_load_are_the_callers(tmp_path):
    path = tmp_path / "two.pkl"
    path.write_bytes(pickle.dumps({"a": np.zeros(1000, np.float32), "b": np.zeros(1000, np.float32)}))
    out = safe_load(path, what="bank", max_array_bytes=4000, max_bytes=8000)  # exactly fits
    assert type(out["a"]) is np.ndarray and out["b"].shape == (1000,)
    with pytest.raises(UnsafePickleError, match=r"declared shape \(1000,\) and dtype float32 \(4000 bytes\): over the limit of 3999 bytes per array"):
        safe_load(path, what="bank", max_array_bytes=3999)
    with pytest.raises(UnsafePickleError, match="per load"):
        safe_load(path, what="bank", max_bytes=7999)


def test_loaded_arrays_are_plain_ndarrays(tmp_path):
    a = np.arange(6.0).reshape(2, 3)
    shared = [a]
    obj = {"x": (a, shared), "y": shared, "z": [np.float32(1.5)]}
    path = tmp_path / "plain.pkl"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        out = safe_load(path, what="test")
        assert type(out["x"][0]) is np.ndarray and type(out["y"][0]) is np.ndarray
        assert out["x"][1] is out["y"]  # shared containers stay shared
        np.testing.assert_array_equal(out["x"][0], a)
        assert (out["x"][0] * 2).__class__ is np.ndarray
