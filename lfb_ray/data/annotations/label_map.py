"""The AVA label map (protobuf text `item { name: "..." id: N }`), read without protobuf."""

from __future__ import annotations

import os
import re

from lfb_ray.data.annotations.errors import error_at
from lfb_ray.storage import read_bytes

__all__ = ["read_label_map"]

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
            raise error_at(path, line, f"unexpected character {text[pos]!r}")
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
            raise error_at(path, last, f"unexpected end of file, expected {what}")
        tok = tokens[i]
        if tok[0] not in kinds and tok[1] not in kinds:
            raise error_at(path, tok[2], f"expected {what}, got {tok[1]!r}")
        i += 1
        return tok

    while i < len(tokens):
        _, word, item_line = expect(("ident",), "'item'")
        if word != "item":
            raise error_at(path, item_line, f"expected 'item', got {word!r}")
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
            raise error_at(path, item_line, "item has no 'id' (or 'label_id')")
        if len(ids) == 2 and ids[0][1] != ids[1][1]:
            raise error_at(path, item_line, f"item has id {ids[0][1]} and label_id {ids[1][1]}")
        kind, value, id_line = ids[0]
        if kind != "number" or not re.fullmatch(r"[-+]?\d+", value):
            raise error_at(path, id_line, f"id must be an integer, got {value!r}")
        class_id = int(value)
        if class_id in out:
            raise error_at(path, id_line, f"duplicate id {class_id} (first defined at line {first_line[class_id]})")
        name_tok = fields.get("name") or fields.get("display_name")
        out[class_id] = name_tok[1] if name_tok else str(class_id)
        first_line[class_id] = id_line
    if not out:
        raise error_at(path, None, "label map has no items")
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
    raise error_at(path, start_line, "unbalanced '{'")
