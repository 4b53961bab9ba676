"""Bank parts: the features of one prepared video, as the bank build's actors write them.

A part is an uncompressed `.npz` (numpy's zip of `.npy` members) with the columns of `write_bank`
(video_id, second, person_index, box, score, feature) and `keyframes`, the keyframes it covers.
`NpzPart` reads its members one at a time from a random-access file, so the merge
(`write_bank_parts`) holds the small columns of every part but the features of only one.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs

from lfb_ray.bank.format import BankError
from lfb_ray.storage import write_bytes_atomic

__all__ = ["COLUMNS", "NpzPart", "write_part"]

COLUMNS = ("video_id", "second", "person_index", "box", "score")  # read for every part before any feature


def write_part(fs: pafs.FileSystem, path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Write a part atomically (a part is visible only when complete: a rerun skips it)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(fs, path, buf.getvalue())


@dataclass(frozen=True)
class NpzPart:
    """A part file on `fs`, read member by member (a `lfb_ray.bank.writer.BankPart`)."""

    fs: pafs.FileSystem
    path: str

    @property
    def name(self) -> str:
        return self.path

    @contextmanager
    def _members(self) -> Iterator[np.lib.npyio.NpzFile]:
        try:
            with self.fs.open_input_file(self.path) as f, np.load(f, allow_pickle=False) as z:
                yield z
        except (zipfile.BadZipFile, EOFError) as e:
            raise BankError(f"bank part {self.path} is not a readable .npz ({e}); delete it and rerun "
                            "jobs/build_bank.py to extract it again") from None

    def _read(self, z: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
        if key not in z.files:
            raise BankError(f"bank part {self.path} has no {key!r} array (it has {', '.join(z.files)})")
        return z[key]

    def columns(self) -> dict[str, np.ndarray]:
        with self._members() as z:
            return {k: self._read(z, k) for k in COLUMNS}

    def keyframes(self) -> int:
        with self._members() as z:
            return int(self._read(z, "keyframes"))

    def feature_shape(self) -> tuple[int, ...]:
        """From the `.npy` header alone: the features are not read."""
        with self._members() as z:
            if "feature" not in z.files:
                raise BankError(f"bank part {self.path} has no 'feature' array (it has {', '.join(z.files)})")
            with z.zip.open("feature.npy") as m:
                major, _ = np.lib.format.read_magic(m)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, _ = read_header(m)
        return tuple(shape)

    def features(self) -> np.ndarray:
        with self._members() as z:
            return self._read(z, "feature")
