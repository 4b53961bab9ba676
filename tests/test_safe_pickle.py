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
