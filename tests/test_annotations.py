"""AVA readers: label map, exclusions, GT/result CSVs with exact error lines, grouping, proposals."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from lfb_ray.data.annotations import (
    AnnotationError,
    group_keyframes,
    load_proposals,
    read_annotation_rows,
    read_annotations,
    read_exclusions,
    read_label_map,
    read_result_rows,
    select_proposals,
)


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- label map -----------------------------------------------------------------------------------

OFFICIAL_PBTXT = """item {
  name: "bend/bow (at the waist)"
  id: 1
}
item {
  name: "crawl"
  id: 2
}
"""


def test_label_map_official_layout(tmp_path):
    assert read_label_map(_write(tmp_path, "m.pbtxt", OFFICIAL_PBTXT)) == {1: "bend/bow (at the waist)", 2: "crawl"}


def test_label_map_loose_layout(tmp_path):
    text = (
        "# AVA classes\n"
        'item { name: "stand" id: 11 }  item{name:"sit" label_id:12}\n'
        "\titem {\n\t\t# comment inside\n\t\tname: 'talk to (e.g., self, a person)'\n"
        "\t\tid: 79 ;\n\t\tdisplay_name: \"ignored\"\n\t}\n"
        'item: { id: 80, name: "watch \\"x\\"" nested { a: 1 } }\n'
    )
    assert read_label_map(_write(tmp_path, "m.pbtxt", text)) == {
        11: "stand", 12: "sit", 79: "talk to (e.g., self, a person)", 80: 'watch "x"'}


def test_label_map_missing_name_falls_back(tmp_path):
    assert read_label_map(_write(tmp_path, "m.pbtxt", "item { id: 5 }\n")) == {5: "5"}


@pytest.mark.parametrize("text, line, match", [
    ('item {\n  name: "a"\n}\n', 1, "no 'id'"),
    ('item { name: "a" id: 1 }\n\nitem {\n  name: "b"\n  id: 1\n}\n', 5, "duplicate id 1"),
    ('item {\n  name: "a"\n  id: x\n}\n', 3, "integer"),
    ('item {\n  name: "a"\n  id: 1\n', 3, "end of file"),
    ('entry { id: 1 }\n', 1, "expected 'item'"),
    ('item { id: 1 }\n  @\n', 2, "unexpected character"),
])
def test_label_map_errors(tmp_path, text, line, match):
    path = _write(tmp_path, "m.pbtxt", text)
    with pytest.raises(AnnotationError, match=match) as exc:
        read_label_map(path)
    assert f"{path}:{line}:" in str(exc.value)


def test_label_map_empty_is_an_error(tmp_path):
    with pytest.raises(AnnotationError, match="no items"):
        read_label_map(_write(tmp_path, "m.pbtxt", "# nothing\n"))


# --- exclusions ----------------------------------------------------------------------------------


def test_exclusions(tmp_path):
    path = _write(tmp_path, "ex.csv", "vid_a,0902\n\nvid-b,1000\r\n")
    assert read_exclusions(path) == {("vid_a", 902), ("vid-b", 1000)}
    assert read_exclusions("") == set()


def test_exclusions_errors(tmp_path):
    with pytest.raises(AnnotationError, match=r"ex\.csv:2: expected 2 comma-separated columns, got 3"):
        read_exclusions(_write(tmp_path, "ex.csv", "a,0902\na,0903,1\n"))
    with pytest.raises(AnnotationError, match=r"ex\.csv:1: timestamp '09x2'"):
        read_exclusions(_write(tmp_path, "ex.csv", "a,09x2\n"))


# --- GT rows -------------------------------------------------------------------------------------

GT8 = (
    "vid_a,0902,0.1,0.2,0.5,0.6,12,0\n"
    "vid_a,0902,0.1,0.2,0.5,0.6,80,0\n"
    "vid_a,0903,0.3,0.3,0.9,0.9,1,4\n"
)


def test_read_gt_rows_8_columns(tmp_path):
    rows = read_annotation_rows(_write(tmp_path, "gt.csv", GT8))
    assert len(rows) == 3
    assert rows.video_ids.tolist() == ["vid_a"] * 3
    assert rows.timestamps.tolist() == [902, 902, 903] and rows.timestamps.dtype == np.int64
    np.testing.assert_array_equal(rows.boxes[2], [0.3, 0.3, 0.9, 0.9])
    assert rows.action_ids.tolist() == [12, 80, 1]
    assert rows.person_ids.tolist() == [0, 0, 4]
    assert rows.line_numbers.tolist() == [1, 2, 3]


def test_read_gt_rows_7_columns_and_blank_lines(tmp_path):
    rows = read_annotation_rows(_write(tmp_path, "gt.csv", "\nv,902,0,0,1,1,5\n\nv,0903,0,0,.5,.5,6\n"))
    assert rows.person_ids.tolist() == [-1, -1]
    assert rows.line_numbers.tolist() == [2, 4]
    assert rows.timestamps.tolist() == [902, 903]


@pytest.mark.parametrize("bad_line, match", [
    ("v,0902,0.1,0.2,0.5,0.6,12", None),  # 7 columns are fine: control case
    ("v,0902,0.1,0.2,0.5,0.6,12,0,9", "expected 7 or 8 comma-separated columns, got 9"),
    ("v,0902,0.1,0.2,0.5", "expected 7 or 8 comma-separated columns, got 5"),
    ("v,09o2,0.1,0.2,0.5,0.6,12,0", "timestamp '09o2'"),
    ("v,0902,0.1,abc,0.5,0.6,12,0", "y1 'abc'"),
    ("v,0902,0.1,0.2,nan,0.6,12,0", "x2 is 'nan'; must be finite"),
    ("v,0902,0.1,0.2,0.5,inf,12,0", "y2 is 'inf'; must be finite"),
    ("v,0902,0.1,0.2,1.5,0.6,12,0", "outside"),
    ("v,0902,-0.1,0.2,0.5,0.6,12,0", "outside"),
    ("v,0902,0.5,0.2,0.5,0.6,12,0", "x1 >= x2"),
    ("v,0902,0.1,0.7,0.5,0.6,12,0", "x1 >= x2 or y1 >= y2"),
    ("v,0902,0.1,0.2,0.5,0.6,81,0", "action_id 81 is not in 1..80"),
    ("v,0902,0.1,0.2,0.5,0.6,0,0", "action_id 0 is not in 1..80"),
    ("v,0902,0.1,0.2,0.5,0.6,1.5,0", "action_id '1.5'"),
    (",0902,0.1,0.2,0.5,0.6,12,0", "empty video_id"),
])
def test_gt_errors_name_file_and_line(tmp_path, bad_line, match):
    # The bad row is on line 4 (line 2 is blank and still counts).
    path = _write(tmp_path, "gt.csv", "v,0902,0.1,0.2,0.5,0.6,12,0\n\nv,0903,0.1,0.2,0.5,0.6,12,0\n" + bad_line + "\n")
    if match is None:
        assert len(read_annotation_rows(path)) == 3
        return
    with pytest.raises(AnnotationError, match=match) as exc:
        read_annotation_rows(path)
    assert str(exc.value).startswith(f"{path}:4: ")


def test_gt_label_map_check_and_no_box_check(tmp_path):
    path = _write(tmp_path, "gt.csv", "v,0902,0.1,0.2,0.5,0.6,12,0\nv,0902,0.1,0.2,0.5,0.6,13,0\n")
    with pytest.raises(AnnotationError, match=r"gt\.csv:2: action_id 13 is not in the label map"):
        read_annotation_rows(path, label_map={12: "a"})
    inverted = _write(tmp_path, "inv.csv", "v,0902,0.6,0.2,0.5,0.6,12,0\n")
    assert len(read_annotation_rows(inverted, check_boxes=False)) == 1


# --- result rows ---------------------------------------------------------------------------------


def test_result_rows_keep_degenerate_boxes(tmp_path):
    path = _write(tmp_path, "res.csv", "v,902,0.5,0.2,0.5,0.6,12,0.91\nv,902,0.6,0.2,0.5,0.6,99,0.5\n")
    rows = read_result_rows(path)
    assert rows.scores.tolist() == [0.91, 0.5]
    assert rows.action_ids.tolist() == [12, 99]
    assert rows.boxes.dtype == np.float64 and rows.boxes.shape == (2, 4)


@pytest.mark.parametrize("bad_line, match", [
    ("v,902,0.1,0.2,0.5,0.6,12", "expected 8 comma-separated columns, got 7"),
    ("v,902,0.1,0.2,0.5,0.6,12,high", "score 'high'"),
    ("v,902,0.1,0.2,0.5,0.6,12,nan", "score is 'nan'"),
    ("v,902,0.1,0.2,-inf,0.6,12,0.5", "x2 is '-inf'"),
])
def test_result_errors(tmp_path, bad_line, match):
    path = _write(tmp_path, "res.csv", "v,902,0.1,0.2,0.5,0.6,12,0.5\n" + bad_line + "\n")
    with pytest.raises(AnnotationError, match=match) as exc:
        read_result_rows(path)
    assert str(exc.value).startswith(f"{path}:2: ")


# --- grouping ------------------------------------------------------------------------------------


def test_identical_boxes_merge_into_one_person(tmp_path):
    text = (
        "vid_b,0905,0.1,0.1,0.2,0.2,3,7\n"
        "vid_a,0903,0.1,0.2,0.5,0.6,12,0\n"
        "vid_a,0903,0.3,0.3,0.9,0.9,1,0\n"  # same entity id, different box: another person
        "vid_a,0903,0.1,0.2,0.5,0.6,80,5\n"  # same box, different entity id: same person
        "vid_a,0902,0.1,0.2,0.5,0.6,14,2\n"
        "vid_a,0903,0.10,0.20,0.50,0.60,17,0\n"  # same floats written differently: same person
    )
    kfs = read_annotations(_write(tmp_path, "gt.csv", text))
    assert list(kfs) == [("vid_a", 902), ("vid_a", 903), ("vid_b", 905)]
    kf = kfs[("vid_a", 903)]
    assert kf.video_id == "vid_a" and kf.timestamp == 903
    assert kf.boxes.dtype == np.float32 and kf.boxes.shape == (2, 4)
    np.testing.assert_allclose(kf.boxes, [[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.9]])
    assert kf.labels.shape == (2, 81) and kf.labels.dtype == np.float32
    assert np.flatnonzero(kf.labels[0]).tolist() == [12, 17, 80]
    assert np.flatnonzero(kf.labels[1]).tolist() == [1]
    assert kf.person_ids.tolist() == [0, 0]
    assert kfs[("vid_b", 905)].person_ids.tolist() == [7]
    assert kfs[("vid_a", 902)].labels[:, 0].sum() == 0


def test_group_keyframes_num_classes_check(tmp_path):
    rows = read_annotation_rows(_write(tmp_path, "gt.csv", "v,902,0,0,1,1,1\nv,902,0,0,1,1,12\n"))
    assert group_keyframes(rows, num_classes=13)[("v", 902)].labels.shape == (1, 13)
    with pytest.raises(AnnotationError, match=r"gt\.csv:2: action_id 12 does not fit num_classes=12"):
        group_keyframes(rows, num_classes=12)


# --- proposals -----------------------------------------------------------------------------------


def _pickle(tmp_path, obj, protocol=2):
    path = tmp_path / "props.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_proposals_fair_5_columns(tmp_path, protocol):
    props = {"-5KQ66BBWC4,0902": np.array([[0.1, 0.2, 0.5, 0.6, 0.99], [0, 0, 0.1, 0.1, 0.3]]),
             "vid_b,1000": np.zeros((0, 5))}
    out = load_proposals(_pickle(tmp_path, props, protocol))
    assert set(out) == {("-5KQ66BBWC4", 902), ("vid_b", 1000)}
    assert out[("-5KQ66BBWC4", 902)].dtype == np.float32
    np.testing.assert_allclose(out[("-5KQ66BBWC4", 902)], props["-5KQ66BBWC4,0902"], rtol=1e-6)
    assert out[("vid_b", 1000)].shape == (0, 5)


def test_proposals_4_columns_and_lists_get_score_one(tmp_path):
    out = load_proposals(_pickle(tmp_path, {"v,0902": [[0.1, 0.2, 0.5, 0.6]], "v,0903": np.ones((2, 4), np.float32)}))
    np.testing.assert_allclose(out[("v", 902)], [[0.1, 0.2, 0.5, 0.6, 1.0]], rtol=1e-6)
    assert out[("v", 903)].shape == (2, 5) and (out[("v", 903)][:, 4] == 1).all()


@pytest.mark.parametrize("obj, match", [
    ({"v_0902": np.ones((1, 5))}, "key 'v_0902'"),
    ({"v,09a2": np.ones((1, 5))}, "key 'v,09a2'"),
    ({"v,0902": np.ones((1, 6))}, r"key 'v,0902': expected shape \[n, 4\] or \[n, 5\], got \[1, 6\]"),
    ({"v,0902": np.ones(5)}, "key 'v,0902': expected shape"),
    ({"v,0902": [["a", "b", "c", "d"]]}, "not a numeric array"),
    ({"v,0902": np.full((1, 5), np.nan)}, "non-finite"),
    ({"v,0902": np.ones((1, 5)), "v,902": np.ones((1, 5))}, "appears twice"),
    ([np.ones((1, 5))], "expected a dict"),
])
def test_proposals_errors_name_file_and_key(tmp_path, obj, match):
    path = _pickle(tmp_path, obj)
    with pytest.raises(AnnotationError, match=match) as exc:
        load_proposals(path)
    assert str(path) in str(exc.value)


class _Hostile:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_proposals_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = _pickle(tmp_path, {"v,0902": _Hostile(str(marker))})
    with pytest.raises(AnnotationError, match=r"refused to unpickle global '(posix|os)\.system'") as exc:
        load_proposals(path)
    assert str(path) in str(exc.value)
    assert not marker.exists()


def test_select_proposals():
    props = np.array([[0, 0, 0.1, 0.1, 0.95], [0, 0, 0.2, 0.2, 0.5], [0, 0, 0.3, 0.3, 0.92]], np.float32)
    np.testing.assert_array_equal(select_proposals(props, 0.9), props[[0, 2]])
    # All below the threshold: thr becomes the best score, so the best box (and its ties) survive.
    low = np.array([[0, 0, 0.1, 0.1, 0.4], [0, 0, 0.2, 0.2, 0.7], [0, 0, 0.3, 0.3, 0.7]], np.float32)
    np.testing.assert_array_equal(select_proposals(low, 0.9), low[[1, 2]])
    np.testing.assert_array_equal(select_proposals(props, 0.0, max_proposals=2), props[:2])
    for missing in (None, np.zeros((0, 5), np.float32)):
        out = select_proposals(missing, 0.9)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, [[0, 0, 1, 1, 1]])


def test_fast_and_exact_parsers_agree(tmp_path):
    # Without blank lines the pyarrow parser runs; a blank line forces the exact Python parser.
    rng = np.random.default_rng(0)
    lines = [f"vid_{i % 3},{902 + i:04d},{x[0]:.6f},{x[1]:.6f},{x[2] + 0.5:.6f},{x[3] + 0.5:.6f},{1 + i % 80},{i}"
             for i, x in enumerate(rng.random((50, 4)) * 0.5)]
    fast = read_annotation_rows(_write(tmp_path, "fast.csv", "\n".join(lines)))
    exact = read_annotation_rows(_write(tmp_path, "exact.csv", "\n".join(lines[:10] + [""] + lines[10:]) + "\n"))
    for name in ("video_ids", "timestamps", "boxes", "action_ids", "person_ids"):
        assert np.array_equal(getattr(fast, name), getattr(exact, name)), name
        assert getattr(fast, name).dtype == getattr(exact, name).dtype, name
    assert fast.line_numbers.tolist() == list(range(1, 51))
    assert exact.line_numbers.tolist() == list(range(1, 11)) + list(range(12, 52))
    res = "\n".join(ln[: ln.rindex(",")] + ",0.5" for ln in lines)
    a = read_result_rows(_write(tmp_path, "r1.csv", res))
    b = read_result_rows(_write(tmp_path, "r2.csv", "\n" + res))
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
    assert a.video_ids.dtype == b.video_ids.dtype and b.line_numbers[0] == 2
