"""AVA file readers: label map, excluded timestamps, annotation/result CSVs, person proposals.

Pure numpy (no Ray, no torch). Every malformed input raises `AnnotationError` naming the file, the
1-based line number and the problem. CSVs go through pyarrow's parser (a 1M-line result file in
about a second); the exact Python parser takes over for blank lines or to locate an error.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field

import numpy as np

from lfb_ray.data.ids import unsafe_video_id
from lfb_ray.redaction import RedactedMessage
from lfb_ray.storage import is_uri, read_bytes

__all__ = [
    "AVA_NUM_ACTIONS",
    "AnnotationError",
    "AnnotationRows",
    "KeyframeBoxes",
    "ResultRows",
    "group_keyframes",
    "load_proposals",
    "read_annotation_rows",
    "read_annotations",
    "read_exclusions",
    "read_label_map",
    "read_result_rows",
    "first_keyframes",
    "cap_annotation_rows",
    "select_proposals",
]

AVA_NUM_ACTIONS = 80  # action ids are 1..80; index 0 of a multi-hot vector stays unused


class AnnotationError(RedactedMessage, ValueError):
    """Malformed AVA input; the message reads `<file>:<line>: <problem>` (line 1-based)."""


def _error(path: str | os.PathLike, line: int | None, problem: str) -> AnnotationError:
    where = f"{os.fspath(path)}:{line}" if line is not None else os.fspath(path)
    return AnnotationError(f"{where}: {problem}")


# ---------------------------------------------------------------------------------------------
# Label map (protobuf text)

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<punct>[{}:,;])
  | (?P<number>[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
""", re.VERBOSE)


def _tokenize(text: str, path: str | os.PathLike) -> list[tuple[str, str, int]]:
    """Splits protobuf text into (kind, text, line) tokens, dropping whitespace and comments."""
    tokens, pos, line = [], 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _error(path, line, f"unexpected character {text[pos]!r}")
        kind, value = m.lastgroup, m.group()
        if kind == "string":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if kind not in ("ws", "comment"):
            tokens.append((kind, value, line))
        line += m.group().count("\n")
        pos = m.end()
    return tokens


def read_label_map(path: str | os.PathLike) -> dict[int, str]:
    """Reads a protobuf-text label map `item { name: "..." id: N }` (also `label_id: N`).

    Any whitespace/indentation, several fields or items per line, `#` comments, optional `:` before
    `{` and `,`/`;` separators are accepted. Unknown fields (e.g. `display_name`) are ignored.

    Returns:
        {id: name} in file order. A missing name falls back to `display_name`, then to str(id).

    Raises:
        AnnotationError: syntax error, item without id, non-integer id, duplicate id, no items.
    """
    tokens = _tokenize(read_bytes(path).decode("utf-8"), path)
    out: dict[int, str] = {}
    first_line: dict[int, int] = {}
    i = 0

    def expect(kinds: tuple[str, ...], what: str) -> tuple[str, str, int]:
        nonlocal i
        if i >= len(tokens):
            last = tokens[-1][2] if tokens else 1
            raise _error(path, last, f"unexpected end of file, expected {what}")
        tok = tokens[i]
        if tok[0] not in kinds and tok[1] not in kinds:
            raise _error(path, tok[2], f"expected {what}, got {tok[1]!r}")
        i += 1
        return tok

    while i < len(tokens):
        _, word, item_line = expect(("ident",), "'item'")
        if word != "item":
            raise _error(path, item_line, f"expected 'item', got {word!r}")
        if i < len(tokens) and tokens[i][1] == ":":
            i += 1
        expect(("{",), "'{'")
        fields: dict[str, tuple[str, str, int]] = {}
        while True:
            kind, key, key_line = expect(("ident", "}"), "a field name or '}'")
            if key == "}":
                break
            nxt = [t[1] for t in tokens[i : i + 2]]
            if nxt[:1] == ["{"] or nxt == [":", "{"]:
                i = _skip_block(tokens, i, path)  # nested message: not used by AVA, skipped
                continue
            expect((":",), f"':' after {key!r}")
            fields[key] = expect(("string", "number", "ident"), f"a value for {key!r}")
            if i < len(tokens) and tokens[i][1] in (",", ";"):
                i += 1
        ids = [fields[k] for k in ("id", "label_id") if k in fields]
        if not ids:
            raise _error(path, item_line, "item has no 'id' (or 'label_id')")
        if len(ids) == 2 and ids[0][1] != ids[1][1]:
            raise _error(path, item_line, f"item has id {ids[0][1]} and label_id {ids[1][1]}")
        kind, value, id_line = ids[0]
        if kind != "number" or not re.fullmatch(r"[-+]?\d+", value):
            raise _error(path, id_line, f"id must be an integer, got {value!r}")
        class_id = int(value)
        if class_id in out:
            raise _error(path, id_line, f"duplicate id {class_id} (first defined at line {first_line[class_id]})")
        name_tok = fields.get("name") or fields.get("display_name")
        out[class_id] = name_tok[1] if name_tok else str(class_id)
        first_line[class_id] = id_line
    if not out:
        raise _error(path, None, "label map has no items")
    return out


def _skip_block(tokens: list[tuple[str, str, int]], i: int, path: str | os.PathLike) -> int:
    """Skips an optional ':' and a balanced `{ ... }` starting at tokens[i]; returns the next index."""
    if tokens[i][1] == ":":
        i += 1
    depth, start_line = 0, tokens[i][2]
    while i < len(tokens):
        depth += {"{": 1, "}": -1}.get(tokens[i][1], 0) if tokens[i][0] == "punct" else 0
        i += 1
        if depth == 0:
            return i
    raise _error(path, start_line, "unbalanced '{'")


# ---------------------------------------------------------------------------------------------
# CSV tables


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
        raise _error(path, int(lines[k]), f"action_id {int(actions[k])} is {what}")
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
                raise _error(path, int(lines[k]), f"{name} is '{cols[name][k]}'; must be finite")
    empty = np.char.str_len(cols["video_id"]) == 0 if len(lines) else np.zeros(0, bool)
    if empty.any():
        raise _error(path, int(lines[int(np.argmax(empty))]), "empty video_id")
    ids, first = np.unique(cols["video_id"], return_index=True) if len(lines) else ((), ())
    for vid, row in zip(ids, first):
        why = unsafe_video_id(str(vid))
        if why:
            raise _error(path, int(lines[row]), why)
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
        raise _error(path, data[: e.start].count(b"\n") + 1, "not UTF-8 text") from None
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
        raise _error(path, k + 1, f"expected {want} comma-separated columns, got {lens[k]}")
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
                    raise _error(path, line, f"{name} {value!r} is not a valid {convert.__name__}") from None
            raise _error(path, None, f"cannot parse column {name}") from None
    return out, lines


def _check_boxes(path: str | os.PathLike, boxes: np.ndarray, lines: np.ndarray) -> None:
    outside = ((boxes < 0) | (boxes > 1)).any(axis=1)
    if outside.any():
        k = int(np.argmax(outside))
        raise _error(path, int(lines[k]), f"box {boxes[k].tolist()} is outside [0, 1]")
    inverted = (boxes[:, 0] >= boxes[:, 2]) | (boxes[:, 1] >= boxes[:, 3])
    if inverted.any():
        k = int(np.argmax(inverted))
        raise _error(path, int(lines[k]), f"box {boxes[k].tolist()} has x1 >= x2 or y1 >= y2")


# ---------------------------------------------------------------------------------------------
# Keyframes


@dataclass(frozen=True)
class KeyframeBoxes:
    """All GT persons of one keyframe, with multi-hot labels."""

    video_id: str
    timestamp: int
    boxes: np.ndarray  # [N, 4] float32 normalised x1, y1, x2, y2
    labels: np.ndarray  # [N, num_classes] float32 multi-hot; column 0 unused
    person_ids: np.ndarray  # [N] int64 entity id of the first row of each box (-1 if absent)


def group_keyframes(rows: AnnotationRows, num_classes: int = 81) -> dict[tuple[str, int], KeyframeBoxes]:
    """Merges rows into keyframes; rows with identical 4 box floats on a keyframe are one person.

    Entity ids are not used for merging (mmaction2 groups by box too). Persons keep the order in which their
    box first appears in the file.

    Args:
        rows: from `read_annotation_rows`.
        num_classes: width of the multi-hot vector (81 for AVA: ids 1..80, index 0 unused).

    Returns:
        {(video_id, timestamp): KeyframeBoxes}, ordered by (video_id, timestamp).

    Raises:
        AnnotationError: an action id >= num_classes or < 1.
    """
    n = len(rows)
    if n == 0:
        return {}
    bad = (rows.action_ids < 1) | (rows.action_ids >= num_classes)
    if bad.any():
        k = int(np.argmax(bad))
        raise _error(rows.path, int(rows.line_numbers[k]),
                     f"action_id {int(rows.action_ids[k])} does not fit num_classes={num_classes}")
    vids, vid_code = np.unique(rows.video_ids, return_inverse=True)
    # Adding 0.0 turns -0.0 into 0.0 so that bit patterns compare like floats.
    bits = (np.asarray(rows.boxes, np.float64) + 0.0).view(np.int64).reshape(n, 4)
    row = np.arange(n)
    order = np.lexsort((row, bits[:, 3], bits[:, 2], bits[:, 1], bits[:, 0], rows.timestamps, vid_code))
    keys = np.stack([vid_code, rows.timestamps, *bits.T], axis=1)[order]  # [n, 6]
    new_person = np.ones(n, bool)
    new_person[1:] = (keys[1:] != keys[:-1]).any(axis=1)
    person_of_sorted = np.cumsum(new_person) - 1
    person = np.empty(n, np.int64)
    person[order] = person_of_sorted
    first_row = order[new_person]  # [P] first file row of each person
    # Order persons by (keyframe, first appearance in the file).
    p_order = np.lexsort((first_row, rows.timestamps[first_row], vid_code[first_row]))
    rank = np.empty_like(p_order)
    rank[p_order] = np.arange(len(p_order))
    person = rank[person]
    first_row = first_row[p_order]
    labels = np.zeros((len(first_row), num_classes), np.float32)
    labels[person, rows.action_ids] = 1.0
    boxes = np.asarray(rows.boxes, np.float32)[first_row]
    pids = np.asarray(rows.person_ids, np.int64)[first_row]
    kf_vid, kf_ts = vid_code[first_row], rows.timestamps[first_row]
    starts = np.flatnonzero(np.r_[True, (kf_vid[1:] != kf_vid[:-1]) | (kf_ts[1:] != kf_ts[:-1])])
    ends = np.r_[starts[1:], len(first_row)]
    out: dict[tuple[str, int], KeyframeBoxes] = {}
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        key = (str(vids[kf_vid[s]]), int(kf_ts[s]))
        out[key] = KeyframeBoxes(video_id=key[0], timestamp=key[1], boxes=boxes[s:e].copy(),
                                 labels=labels[s:e].copy(), person_ids=pids[s:e].copy())
    return out


def first_keyframes(keys, n: int) -> set[tuple[str, int]]:
    """The first `n` of the (video_id, second) keyframes `keys`, by video id then second; all of them
    when `n` is 0. `data.max_keyframes_per_split` (trying a config on a few keyframes before paying
    for the whole set): prepare, the bank's coverage and val mAP all keep the same keyframes."""
    keys = {(str(v), int(t)) for v, t in keys}
    return keys if n <= 0 else set(sorted(keys)[:n])


def cap_annotation_rows(rows: AnnotationRows, n: int) -> AnnotationRows:
    """`rows` of the first `n` keyframes only (`first_keyframes`); `rows` itself when n is 0."""
    if n <= 0:
        return rows
    keep = first_keyframes(zip(rows.video_ids.tolist(), rows.timestamps.tolist()), n)
    mask = np.array([(str(v), int(t)) in keep for v, t in zip(rows.video_ids.tolist(), rows.timestamps.tolist())],
                    dtype=bool).reshape(-1)
    return AnnotationRows(video_ids=rows.video_ids[mask], timestamps=rows.timestamps[mask], boxes=rows.boxes[mask],
                          action_ids=rows.action_ids[mask], person_ids=rows.person_ids[mask],
                          line_numbers=rows.line_numbers[mask], path=rows.path)


def read_annotations(path: str | os.PathLike, num_classes: int = 81,
                     label_map: dict[int, str] | None = None) -> dict[tuple[str, int], KeyframeBoxes]:
    """`read_annotation_rows` + `group_keyframes`: {(video_id, timestamp): KeyframeBoxes}."""
    return group_keyframes(read_annotation_rows(path, label_map=label_map), num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# Person proposals

_PROPOSAL_KEY = re.compile(r"([^,\s]+),(\d+)")


def load_proposals(path: str | os.PathLike) -> dict[tuple[str, int], np.ndarray]:
    """Loads a person-proposal pickle `{"<video_id>,<%04d second>": boxes}` (FAIR / mmaction2).

    The pickle is read with `lfb_ray.safe_pickle.safe_load`: only numpy arrays and plain builtins.

    Args:
        path: the .pkl file.

    Returns:
        {(video_id, timestamp): [n, 5] float32 (x1, y1, x2, y2, score) normalised}; [n, 4]
        entries get score 1.0; values may be stored as arrays or nested lists.

    Raises:
        AnnotationError: a refused global or corrupt pickle, a non-dict, a bad key, a value that
            is not [n, 4]/[n, 5] finite numbers, or two keys for one keyframe.
    """
    from lfb_ray.safe_pickle import UnsafePickleError, safe_load

    try:
        obj = safe_load(io.BytesIO(read_bytes(path)) if is_uri(path) else path, what="proposals")
    except UnsafePickleError as e:
        raise AnnotationError(str(e)) from None
    if not isinstance(obj, dict):
        raise _error(path, None, f"expected a dict of proposals, got {type(obj).__name__}")
    out: dict[tuple[str, int], np.ndarray] = {}
    for key, value in obj.items():
        if isinstance(key, bytes):
            key = key.decode("latin1")
        m = _PROPOSAL_KEY.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            raise _error(path, None, f"key {key!r} is not '<video_id>,<timestamp>'")
        why = unsafe_video_id(m.group(1))
        if why:
            raise _error(path, None, f"key {key!r}: {why}")
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError):
            raise _error(path, None, f"key {key!r}: value is not a numeric array") from None
        if arr.size == 0:
            arr = arr.reshape(0, 5)
        if arr.ndim != 2 or arr.shape[1] not in (4, 5):
            raise _error(path, None, f"key {key!r}: expected shape [n, 4] or [n, 5], got {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise _error(path, None, f"key {key!r}: non-finite values")
        if arr.shape[1] == 4:
            arr = np.concatenate([arr, np.ones((len(arr), 1))], axis=1)
        k = (m.group(1), int(m.group(2)))
        if k in out:
            raise _error(path, None, f"key {key!r}: keyframe {k} appears twice")
        out[k] = arr.astype(np.float32)
    return out


def select_proposals(props: np.ndarray | None, score_thr: float, max_proposals: int = 1000) -> np.ndarray:
    """Selects the proposals of one keyframe.

    thr = min(score_thr, best score); keep score >= thr (so the best box always survives); keep
    the first `max_proposals` in stored order (as mmaction2 does). A missing or empty entry gives
    one whole-frame box with score 1.

    Args:
        props: [n, 5] (x1, y1, x2, y2, score), or None when the keyframe has no entry.

    Returns:
        [m, 5] float32, 1 <= m <= max_proposals.
    """
    if props is None or len(props) == 0:
        return np.array([[0.0, 0.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    props = np.asarray(props, dtype=np.float32)
    thr = min(float(score_thr), float(props[:, 4].max()))
    return props[props[:, 4] >= thr][:max_proposals]
