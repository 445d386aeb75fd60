"""Text-classification corpora from local TSV / CSV / JSON-lines files.

* TSV (``tsv_quoting="auto"``): read with ``csv.QUOTE_NONE`` (quotes are ordinary characters, as in
  GLUE files, which contain unbalanced quotes) unless the file is CSV-style quoted: some field is
  wrapped in ``"`` and every field that contains a ``"`` is wrapped in ``"`` with inner quotes
  doubled. The shared AG News TSVs are written that way (pandas' default: 397 and 278 such rows);
  read with ``QUOTE_NONE`` their texts would keep ``""`` artifacts. Force either with
  ``tsv_quoting="none"`` / ``"minimal"``.
* CSV: the standard dialect (``"`` quoting, doubled quotes).
* JSON lines (``.jsonl`` / ``.json``): one object per line; blank lines are skipped.
* Header auto-detection (``has_header=None``): the first row is a header when it contains a
  requested column name or every cell is a usual column name (``text``, ``sentence``, ``label``,
  ...), or when its label cell is not an integer while the next rows' labels are.
* Without a header, columns are addressed by 0-based index (default: text 0, label 1).
* Labels: with ``label_names`` each raw label must be one of the names or an index into them; else
  integer labels stay as they are (names ``"0"``, ``"1"``, ...); string labels are numbered in
  sorted order, except the AG News set, which gets its canonical order World, Sports, Business,
  Sci/Tech.
* Texts are stripped of surrounding whitespace; an empty text or label is an error.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, get_args

from fedpeft.core.errors import ConfigError, DataError
from fedpeft.data.errors import MissingDataError
from fedpeft.data.examples import Corpus, TextExample

Format = Literal["tsv", "csv", "jsonl"]
TsvQuoting = Literal["auto", "none", "minimal"]
TSV_QUOTINGS: tuple[str, ...] = get_args(TsvQuoting)
FORMATS: tuple[str, ...] = get_args(Format)
_FORMAT_BY_NAME: dict[str, Format] = {"tsv": "tsv", "csv": "csv", "jsonl": "jsonl"}
_SUFFIX_FORMAT: dict[str, Format] = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}

AGNEWS_LABELS: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")
_CANONICAL_ORDERS: tuple[tuple[str, ...], ...] = (AGNEWS_LABELS,)

TEXT_COLUMN_NAMES: tuple[str, ...] = ("text", "sentence", "content", "review", "document", "sentence1")
LABEL_COLUMN_NAMES: tuple[str, ...] = ("label", "labels", "class", "category", "target", "sentiment")
_HEADER_NAMES = frozenset(TEXT_COLUMN_NAMES + LABEL_COLUMN_NAMES + ("id", "idx", "title", "description"))

# (line number, raw text, raw label)
_Row = tuple[int, str, str]


def _is_int(s: str) -> bool:
    try:
        int(s.strip())
    except ValueError:
        return False
    return True


def _infer_format(path: Path, fmt: str | None) -> Format:
    if fmt is not None:
        if fmt in _FORMAT_BY_NAME:
            return _FORMAT_BY_NAME[fmt]
        raise ConfigError(f"format={fmt!r} is not one of {FORMATS}; pass one of them or None (from suffix).")
    suffix = path.suffix.lower()
    if suffix not in _SUFFIX_FORMAT:
        raise ConfigError(
            f"cannot infer format of {path} from suffix {suffix!r} (known: {sorted(_SUFFIX_FORMAT)}); "
            f"pass format= one of {FORMATS}."
        )
    return _SUFFIX_FORMAT[suffix]


def _column_index(
    spec: str | int | None, header: Sequence[str] | None, defaults: Sequence[str], fallback: int,
    what: str, path: Path,
) -> int:
    if isinstance(spec, int):
        width = len(header) if header is not None else None
        if spec < 0 or (width is not None and spec >= width):
            raise DataError(f"{what}={spec} is out of range for {path} (columns: {list(header or [])}).")
        return spec
    if spec is not None:
        if header is None:
            raise DataError(
                f"{what}={spec!r} names a column but {path} has no header; pass a 0-based column index "
                "or has_header=True."
            )
        if spec not in header:
            raise DataError(f"{what}={spec!r} is not a column of {path}; available columns: {list(header)}.")
        return list(header).index(spec)
    if header is not None:
        lowered = [h.strip().lower() for h in header]
        for name in defaults:
            if name in lowered:
                return lowered.index(name)
    return fallback


def _looks_like_header(
    first: Sequence[str], following: Sequence[Sequence[str]], requested: Sequence[str], label_idx: int,
) -> bool:
    cells = [c.strip() for c in first]
    if any(r in cells for r in requested):
        return True
    if cells and all(c.lower() in _HEADER_NAMES for c in cells):
        return True
    if len(cells) > label_idx and not _is_int(cells[label_idx]):
        labels = [row[label_idx] for row in following if len(row) > label_idx]
        return bool(labels) and all(_is_int(v) for v in labels)
    return False


def tsv_is_csv_quoted(content: str) -> bool:
    """Whether a TSV text uses CSV-style quoting (see module docstring); False if it has no quotes."""
    seen_quoted = False
    for line in content.splitlines():
        if '"' not in line:
            continue
        for field in line.split("\t"):
            if '"' not in field:
                continue
            inner = field[1:-1]
            if len(field) < 2 or field[0] != '"' or field[-1] != '"' or '"' in inner.replace('""', ""):
                return False
            seen_quoted = True
    return seen_quoted


def _read_delimited(
    path: Path, fmt: Format, text_column: str | int | None, label_column: str | int | None,
    has_header: bool | None, tsv_quoting: TsvQuoting,
) -> Iterator[_Row]:
    with path.open(encoding="utf-8", newline="") as f:
        content = f.read()
    if fmt == "tsv":
        quoted = tsv_quoting == "minimal" or (tsv_quoting == "auto" and tsv_is_csv_quoted(content))
        reader = csv.reader(
            io.StringIO(content, newline=""), delimiter="\t",
            quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE, strict=quoted,
        )
    else:
        reader = csv.reader(io.StringIO(content, newline=""), strict=True)
    rows: list[tuple[int, list[str]]] = []
    try:
        for row in reader:
            if row and any(c.strip() for c in row):
                rows.append((reader.line_num, row))
    except csv.Error as e:
        raise DataError(
            f"{path}: line {reader.line_num} cannot be parsed as {fmt.upper()} ({e}); fix the quoting"
            + (" or pass tsv_quoting='none'." if fmt == "tsv" else ".")
        ) from e
    if not rows:
        raise DataError(f"{path} has no examples (the file is empty); pass a file with rows.")
    requested = [c for c in (text_column, label_column) if isinstance(c, str)]
    if has_header is None:
        label_guess = label_column if isinstance(label_column, int) else 1
        has_header = _looks_like_header(rows[0][1], [r for _, r in rows[1:21]], requested, label_guess)
    header = [c.strip() for c in rows[0][1]] if has_header else None
    body = rows[1:] if has_header else rows
    ti = _column_index(text_column, header, TEXT_COLUMN_NAMES, 0, "text_column", path)
    li = _column_index(label_column, header, LABEL_COLUMN_NAMES, 1, "label_column", path)
    if ti == li:
        raise DataError(
            f"text_column and label_column are both column {ti} of {path}; pass distinct columns."
        )
    for lineno, row in body:
        if len(row) <= max(ti, li):
            raise DataError(
                f"{path}: line {lineno} has {len(row)} column(s), needs text (column {ti}) and label "
                f"(column {li}); fix or remove the row."
            )
        yield lineno, row[ti], row[li]


def _json_key(
    obj: dict[str, object], spec: str | None, defaults: Sequence[str], what: str, path: Path, lineno: int,
) -> str:
    key = spec if spec is not None else next((k for k in defaults if k in obj), None)
    if key is None or key not in obj:
        raise DataError(
            f"{path}: line {lineno} has no {what} {key!r}; available columns: {list(obj)}. "
            f"Pass {what}= one of them."
        )
    return key


def _read_jsonl(path: Path, text_column: str | int | None, label_column: str | int | None) -> Iterator[_Row]:
    if isinstance(text_column, int) or isinstance(label_column, int):
        raise DataError(f"{path} is JSON lines: pass text_column/label_column as key names, not indices.")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({e}); fix or remove it.") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {lineno} is not a JSON object; each line must be one object.")
            tk = _json_key(obj, text_column, TEXT_COLUMN_NAMES, "text_column", path, lineno)
            lk = _json_key(obj, label_column, LABEL_COLUMN_NAMES, "label_column", path, lineno)
            text, label = obj[tk], obj[lk]
            yield lineno, "" if text is None else str(text), "" if label is None else str(label)


def _label_mapping(
    raw: Sequence[str], label_names: Sequence[str] | None, path: Path
) -> tuple[dict[str, int], tuple[str, ...]]:
    distinct = sorted(set(raw))
    if label_names is not None:
        names = tuple(label_names)
        mapping: dict[str, int] = {n: i for i, n in enumerate(names)}
        for v in distinct:
            if v in mapping:
                continue
            if _is_int(v) and 0 <= int(v) < len(names):
                mapping[v] = int(v)
            else:
                raise DataError(
                    f"{path}: label {v!r} is not in label_names={list(names)} and is not an index into them; "
                    "fix label_names."
                )
        return mapping, names
    if all(_is_int(v) for v in distinct):
        ints = {v: int(v) for v in distinct}
        if min(ints.values()) < 0:
            raise DataError(
                f"{path}: integer labels must be >= 0, found {min(ints.values())}; pass label_names."
            )
        return ints, tuple(str(i) for i in range(max(ints.values()) + 1))
    for order in _CANONICAL_ORDERS:
        if set(distinct) == set(order):
            return {n: i for i, n in enumerate(order)}, order
    return {n: i for i, n in enumerate(distinct)}, tuple(distinct)


def load_text_classification(
    path: str | os.PathLike[str],
    *,
    text_column: str | int | None = None,
    label_column: str | int | None = None,
    format: str | None = None,  # noqa: A002 - public keyword named as in the spec
    has_header: bool | None = None,
    label_names: Sequence[str] | None = None,
    name: str | None = None,
    tsv_quoting: TsvQuoting = "auto",
) -> Corpus:
    """Classification corpus from a local file (see the module docstring for the rules)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingDataError(
            f"path={str(p)!r} does not exist or is not a file (searched: {p.resolve()}); pass an existing "
            "file, or use fedpeft.data.paths.shared_data_path(name) with FEDPEFT_DATA_DIR set."
        )
    if label_names is not None and (isinstance(label_names, str) or len(label_names) == 0):
        raise ConfigError(f"label_names={label_names!r} must be a non-empty sequence of strings.")
    if tsv_quoting not in TSV_QUOTINGS:
        raise ConfigError(f"tsv_quoting={tsv_quoting!r} is not one of {TSV_QUOTINGS}; pick one of them.")
    fmt = _infer_format(p, format)
    try:
        if fmt == "jsonl":
            rows = list(_read_jsonl(p, text_column, label_column))
        else:
            rows = list(_read_delimited(p, fmt, text_column, label_column, has_header, tsv_quoting))
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text ({e}); re-encode it as UTF-8.") from e
    if not rows:
        raise DataError(f"{p} has no examples (only a header or blank lines); pass a file with rows.")
    texts: list[str] = []
    raw_labels: list[str] = []
    for lineno, text, label in rows:
        text, label = text.strip(), label.strip()
        if not text:
            raise DataError(f"{p}: line {lineno} has an empty text; fix or remove the row.")
        if not label:
            raise DataError(f"{p}: line {lineno} has an empty label; fix or remove the row.")
        texts.append(text)
        raw_labels.append(label)
    mapping, names = _label_mapping(raw_labels, label_names, p)
    examples = tuple(TextExample(t, mapping[lab]) for t, lab in zip(texts, raw_labels, strict=True))
    return Corpus(examples, names, "classification", name if name is not None else p.stem)
