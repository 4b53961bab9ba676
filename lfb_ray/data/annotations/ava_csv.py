"""AVA CSV tables: ground truth, results and excluded timestamps, as typed numpy columns.

CSVs go through pyarrow's parser (a 1M-line result file in about a second); the exact Python parser
takes over for blank lines or to locate an error, so every error names its file and line.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field

import numpy as np

from lfb_ray.data.annotations.errors import error_at
from lfb_ray.data.ids import unsafe_video_id
from lfb_ray.storage import read_bytes

__all__ = ["AVA_NUM_ACTIONS", "AnnotationRows", "ResultRows", "read_annotation_rows", "read_exclusions",
           "read_result_rows"]

AVA_NUM_ACTIONS = 80  # action ids are 1..80; index 0 of a multi-hot vector stays unused


def read_exclusions(path: str | os.PathLike) -> set[tuple[str, int]]:
    """Reads the excluded-timestamps CSV (`video_id,timestamp`, no header).

    Args:
        path: the CSV; "" means no exclusions.

    Returns:
        {(video_id, timestamp)}.

    Raises:
        AnnotationError: a line without exactly 2 columns, an empty video id or a non-integer timestamp.
    """
    if not os.fspath(path):
        return set()
    cols, _ = _read_columns(path, (_EXCLUSION_COLUMNS,))
    return set(zip(cols["video_id"].tolist(), cols["timestamp"].tolist(), strict=True))


@dataclass(frozen=True)
class AnnotationRows:
    """Raw rows of an AVA annotation CSV, one per (box, action), in file order.

    Boxes stay float64 (the parsed CSV values) so the evaluator's IoU is computed exactly as the
    official evaluator does (in float64); `group_keyframes` gives float32 boxes.
    """

    video_ids: np.ndarray  # [N] str
    timestamps: np.ndarray  # [N] int64 seconds
    boxes: np.ndarray  # [N, 4] float64 normalised x1, y1, x2, y2
    action_ids: np.ndarray  # [N] int64
    person_ids: np.ndarray  # [N] int64 entity id; -1 for 7-column rows
    line_numbers: np.ndarray  # [N] int64, 1-based
    path: str = ""

    def __len__(self) -> int:
        return len(self.timestamps)


@dataclass(frozen=True)
class ResultRows:
    """Rows of an AVA result (detection) CSV `video_id,timestamp,x1,y1,x2,y2,action_id,score`."""

    video_ids: np.ndarray  # [R] str
    timestamps: np.ndarray  # [R] int64
    boxes: np.ndarray  # [R, 4] float64 normalised x1, y1, x2, y2 (may be degenerate)
    action_ids: np.ndarray  # [R] int64
    scores: np.ndarray  # [R] float64
    line_numbers: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [R]; empty if in memory
    path: str = ""

    def __len__(self) -> int:
        return len(self.timestamps)


_GT_COLUMNS = ("video_id", "timestamp", "x1", "y1", "x2", "y2", "action_id", "person_id")
_RESULT_COLUMNS = ("video_id", "timestamp", "x1", "y1", "x2", "y2", "action_id", "score")
_EXCLUSION_COLUMNS = ("video_id", "timestamp")
_INT_COLUMNS = ("timestamp", "action_id", "person_id")


def read_annotation_rows(path: str | os.PathLike, label_map: dict[int, str] | None = None,
                         check_boxes: bool = True) -> AnnotationRows:
    """Reads a GT CSV: `video_id,timestamp,x1,y1,x2,y2,action_id[,person_id]` (7 or 8 columns).

    Args:
        path: CSV without header; blank lines are skipped; timestamps may be zero-padded.
        label_map: if given, action ids must be label-map ids (GT used for training with a
            custom class list); otherwise they must be in 1..80.
        check_boxes: require 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1.

    Returns:
        AnnotationRows with N rows.

    Raises:
        AnnotationError: wrong column count, non-numeric or non-finite field, bad box, unknown action id.
    """
    cols, lines = _read_columns(path, (_GT_COLUMNS, _GT_COLUMNS[:7]))
    boxes = np.stack([cols[k] for k in ("x1", "y1", "x2", "y2")], axis=1).reshape(-1, 4)
    if check_boxes:
        _check_boxes(path, boxes, lines)
    actions = cols["action_id"]
    if label_map is not None:
        bad = ~np.isin(actions, np.fromiter(label_map, np.int64, len(label_map)))
        what = "not in the label map"
    else:
        bad = (actions < 1) | (actions > AVA_NUM_ACTIONS)
        what = f"not in 1..{AVA_NUM_ACTIONS}"
    if bad.any():
        k = int(np.argmax(bad))
        raise error_at(path, int(lines[k]), f"action_id {int(actions[k])} is {what}")
    return AnnotationRows(video_ids=cols["video_id"], timestamps=cols["timestamp"], boxes=boxes,
                          action_ids=actions, person_ids=cols["person_id"], line_numbers=lines,
                          path=os.fspath(path))


def read_result_rows(path: str | os.PathLike) -> ResultRows:
    """Reads a result CSV `video_id,timestamp,x1,y1,x2,y2,action_id,score` (8 columns).

    Degenerate or out-of-range boxes and unknown action ids are kept: the evaluator decides what
    to do with them (the official one drops degenerate boxes and ids outside the label map).

    Raises:
        AnnotationError: wrong column count, non-numeric or non-finite field.
    """
    cols, lines = _read_columns(path, (_RESULT_COLUMNS,))
    boxes = np.stack([cols[k] for k in ("x1", "y1", "x2", "y2")], axis=1).reshape(-1, 4)
    return ResultRows(video_ids=cols["video_id"], timestamps=cols["timestamp"], boxes=boxes,
                      action_ids=cols["action_id"], scores=cols["score"], line_numbers=lines,
                      path=os.fspath(path))


def _read_columns(path: str | os.PathLike,
                  layouts: tuple[tuple[str, ...], ...]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Typed columns of a header-less CSV whose rows follow one of `layouts` (widest first).

    Columns named in _INT_COLUMNS are int64, "video_id" str, the rest float64 (finite). Columns
    of the widest layout missing from a shorter row are -1 (the optional person_id).

    Returns:
        ({name: [N] array}, [N] 1-based line numbers).
    """
    data = read_bytes(path)
    cols = None
    for names in layouts:
        cols = _parse_fast(data, names)
        if cols is not None:
            break
    if cols is None:
        cols, lines = _parse_exact(path, data, layouts)
    else:
        lines = np.arange(1, len(cols["video_id"]) + 1, dtype=np.int64)
    for name in layouts[0]:
        if name not in cols:
            cols[name] = np.full(len(lines), -1, np.int64)
        elif name not in _INT_COLUMNS and name != "video_id":
            finite = np.isfinite(cols[name])
            if not finite.all():
                k = int(np.argmin(finite))
                raise error_at(path, int(lines[k]), f"{name} is '{cols[name][k]}'; must be finite")
    empty = np.char.str_len(cols["video_id"]) == 0 if len(lines) else np.zeros(0, bool)
    if empty.any():
        raise error_at(path, int(lines[int(np.argmax(empty))]), "empty video_id")
    ids, first = np.unique(cols["video_id"], return_index=True) if len(lines) else ((), ())
    for vid, row in zip(ids, first):
        why = unsafe_video_id(str(vid))
        if why:
            raise error_at(path, int(lines[row]), why)
    return cols, lines


def _parse_fast(data: bytes, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """pyarrow's C++ CSV parser (~20x faster than Python on a 1M-row result file).

    Returns None whenever the file is not plainly well-formed (bad field, other column count,
    blank lines that would shift line numbers, no pyarrow): the exact parser then finds and
    reports the problem.
    """
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
    except ImportError:
        return None
    types = {n: pa.string() if n == "video_id" else pa.int64() if n in _INT_COLUMNS else pa.float64()
             for n in names}
    try:
        table = pacsv.read_csv(
            pa.BufferReader(data), read_options=pacsv.ReadOptions(column_names=list(names)),
            convert_options=pacsv.ConvertOptions(column_types=types, null_values=[], strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False))
    except Exception:  # any failure: the exact parser below reports it precisely
        return None
    num_lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    if table.num_rows != num_lines:
        return None
    out = {}
    for n in names:
        column = table.column(n)
        out[n] = (np.asarray(column.to_numpy(zero_copy_only=False), dtype=str) if n == "video_id"
                  else column.to_numpy().astype(np.int64 if n in _INT_COLUMNS else np.float64))
    return out


def _parse_exact(path: str | os.PathLike, data: bytes,
                 layouts: tuple[tuple[str, ...], ...]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Python parser: skips blank lines, accepts what int()/float() accept, names the bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error_at(path, data[: e.start].count(b"\n") + 1, "not UTF-8 text") from None
    raw = text.split("\n")
    if '"' in text:  # quoted fields: let the csv module handle them (AVA never quotes)
        rows = [next(csv.reader([ln]), []) if ln.strip() else [] for ln in raw]
    else:
        rows = [ln.rstrip("\r").split(",") if ln.strip() else [] for ln in raw]
    lens = np.fromiter(map(len, rows), np.int64, len(rows))
    allowed = [len(names) for names in layouts]
    nonblank = lens > 0
    bad = nonblank & ~np.isin(lens, allowed)
    if bad.any():
        k = int(np.argmax(bad))
        want = " or ".join(map(str, sorted(allowed)))
        raise error_at(path, k + 1, f"expected {want} comma-separated columns, got {lens[k]}")
    lines = (np.flatnonzero(nonblank) + 1).astype(np.int64)
    names = layouts[0]
    kept = [rows[k - 1] for k in lines.tolist()]
    if len(layouts) > 1 and (lens[nonblank] != len(names)).any():
        kept = [r + ["-1"] * (len(names) - len(r)) for r in kept]
    columns = list(zip(*kept, strict=True)) if kept else [()] * len(names)
    out = {}
    for name, col in zip(names, columns, strict=True):
        if name == "video_id":
            out[name] = np.asarray(col, dtype=str).reshape(len(lines))
            continue
        convert, dtype = (int, np.int64) if name in _INT_COLUMNS else (float, np.float64)
        try:
            out[name] = np.asarray(col, dtype=str).astype(dtype).reshape(len(lines))
        except (ValueError, OverflowError):
            for value, line in zip(col, lines.tolist(), strict=True):
                try:
                    np.array([convert(value)], dtype)
                except (ValueError, OverflowError):
                    raise error_at(path, line, f"{name} {value!r} is not a valid {convert.__name__}") from None
            raise error_at(path, None, f"cannot parse column {name}") from None
    return out, lines


def _check_boxes(path: str | os.PathLike, boxes: np.ndarray, lines: np.ndarray) -> None:
    outside = ((boxes < 0) | (boxes > 1)).any(axis=1)
    if outside.any():
        k = int(np.argmax(outside))
        raise error_at(path, int(lines[k]), f"box {boxes[k].tolist()} is outside [0, 1]")
    inverted = (boxes[:, 0] >= boxes[:, 2]) | (boxes[:, 1] >= boxes[:, 3])
    if inverted.any():
        k = int(np.argmax(inverted))
        raise error_at(path, int(lines[k]), f"box {boxes[k].tolist()} has x1 >= x2 or y1 >= y2")
