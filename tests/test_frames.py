"""Frame stores (lfb_ray.data.frames): written in frame order, read back a frame at a time."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from lfb_ray.data.frames import FrameStore, FrameStoreWriter


def test_write_in_order_read_back_and_refuse_out_of_order(tmp_path):
    fs = pafs.LocalFileSystem()
    path = str(tmp_path / "v" / "frames.arrow")
    w = FrameStoreWriter(fs, path)
    assert [w.add(i, bytes([i]) * (i + 1)) for i in (3, 7, 8, 20)] == [0, 1, 2, 3]
    for bad in (20, 5):  # a repeat or a step back: the rows would no longer be in frame order
        with pytest.raises(ValueError, match=f"frame {bad} after frame 20"):
            w.add(bad, b"x")
    assert w.close() > 0
    assert not list((tmp_path / "v").glob("*.tmp-*"))
    store = FrameStore(path)
    assert [store.frame_index(r) for r in range(4)] == [3, 7, 8, 20]
    assert bytes(store.jpeg(1)) == bytes([7]) * 8 and bytes(store.jpeg(3)) == bytes([20]) * 21
