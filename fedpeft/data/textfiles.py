"""Corpora from a user's local file: TSV, CSV, JSON lines or plain text (issue 21).

:func:`load_file` reads a classification or a causal-LM corpus from a :class:`FileSpec` (the
``data-*`` run-config knobs); :func:`load_text_classification` is the classification reader.

* Format: given, or from the suffix (``.tsv``, ``.csv``, ``.jsonl`` / ``.json``), or, for any
  other name (``.txt`` included), from the content (:func:`sniff_format`): a first line that is a JSON
  object is JSON lines, tab-separated lines are TSV, consistently comma-separated lines CSV,
  anything else plain text (one example per line; causal LM only).
* Columns without a header (``text_column`` / ``label_column`` not given): text 0, label 1,
  unless the data says otherwise: when another column has fewer distinct values than column
  1 and column 1 has the longer cells (a label first, as in the SMS spam corpus), that column
  is the label and the longest column the text.
* Users: ``user_column`` names the column (or JSON key) of who wrote each row; the
  ``natural`` partitioner then gives one client per user.
* Causal LM: plain text (a line an example), JSON lines with a text field, chat JSON lines
  (a ``messages`` list of ``{"role", "content"}``, rendered by the caller's ``render_chat``,
  the model's chat template), or the text column of a TSV / CSV.

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
import statistics
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from fedpeft.core.errors import ConfigError, DataError
from fedpeft.data.errors import MissingDataError
from fedpeft.data.examples import Corpus, Task, TextExample

Format = Literal["tsv", "csv", "jsonl", "text"]
TsvQuoting = Literal["auto", "none", "minimal"]
TSV_QUOTINGS: tuple[str, ...] = get_args(TsvQuoting)
FORMATS: tuple[str, ...] = get_args(Format)
_FORMAT_BY_NAME: dict[str, Format] = {"tsv": "tsv", "csv": "csv", "jsonl": "jsonl", "text": "text"}
_SUFFIX_FORMAT: dict[str, Format] = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
#: Lines of a file :func:`sniff_format` and the column inference look at.
SNIFF_LINES = 200
#: Longest cell of a first row that the header detection takes for a column name.
HEADER_CELL_CHARS = 32
#: Chat roles a ``messages`` list may use.
CHAT_ROLES = ("system", "user", "assistant")
Header = Literal["auto", "yes", "no"]
HEADERS: tuple[str, ...] = get_args(Header)
ColumnSpec = str | int | None
RenderChat = Callable[[list[dict[str, str]]], str]

AGNEWS_LABELS: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")
_CANONICAL_ORDERS: tuple[tuple[str, ...], ...] = (AGNEWS_LABELS,)

TEXT_COLUMN_NAMES: tuple[str, ...] = ("text", "sentence", "content", "review", "document", "sentence1")
LABEL_COLUMN_NAMES: tuple[str, ...] = ("label", "labels", "class", "category", "target", "sentiment")
_HEADER_NAMES = frozenset(TEXT_COLUMN_NAMES + LABEL_COLUMN_NAMES + ("id", "idx", "title", "description"))

# (line number, raw text, raw label, raw user)
_Row = tuple[int, str, str, str | None]


@dataclass(frozen=True)
class FileSpec:
    """How to read a user's file: the ``data-*`` knobs (``eval-*`` for the evaluation file).

    Columns are 0-based indices or header names (JSON keys for JSON lines); ``None`` infers
    them. ``header`` is ``"auto"`` (detected), ``"yes"`` or ``"no"``; ``format`` ``None``
    infers it from the suffix or the content; ``label_names`` fixes the label order.
    """

    format: str | None = None
    text_column: ColumnSpec = None
    label_column: ColumnSpec = None
    user_column: ColumnSpec = None
    label_names: tuple[str, ...] | None = None
    header: str = "auto"

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise ConfigError(f"data-format={self.format!r} is not one of {('auto', *FORMATS)}")
        if self.header not in HEADERS:
            raise ConfigError(f"data-header={self.header!r} is not one of {HEADERS}")
        if self.label_names is not None and (
                not self.label_names or any(not n for n in self.label_names)):
            raise ConfigError(f"data-label-names={self.label_names!r} must list non-empty names")
        cols = [c for c in (self.text_column, self.label_column, self.user_column) if c is not None]
        if len(set(map(str, cols))) != len(cols):
            raise ConfigError(f"data-text-column, data-label-column and data-user-column must be "
                              f"distinct columns, got {cols}")

    @property
    def has_header(self) -> bool | None:
        return {"auto": None, "yes": True, "no": False}[self.header]


def column_spec(raw: str) -> ColumnSpec:
    """A column knob's value: ``""`` infers it, digits are a 0-based index, else a name."""
    raw = raw.strip()
    if not raw:
        return None
    return int(raw) if raw.isdigit() else raw


def _is_int(s: str) -> bool:
    try:
        int(s.strip())
    except ValueError:
        return False
    return True


def sniff_format(content: str) -> Format:
    """The format of a file's text judged from its first :data:`SNIFF_LINES` non-blank lines."""
    lines = [ln for ln in content.splitlines() if ln.strip()][:SNIFF_LINES]
    if not lines:
        return "text"
    first = lines[0].strip()
    if first.startswith("{"):
        try:
            if isinstance(json.loads(first), dict):
                return "jsonl"
        except json.JSONDecodeError:
            pass
    if sum("\t" in ln for ln in lines) >= 0.9 * len(lines):
        return "tsv"
    try:
        widths = [len(r) for r in csv.reader(io.StringIO("\n".join(lines)))]
    except csv.Error:
        widths = []
    if widths and min(widths) >= 2 and max(widths) == min(widths):
        return "csv"
    return "text"


def _infer_format(path: Path, fmt: str | None, content: str | None = None) -> Format:
    if fmt is not None:
        if fmt in _FORMAT_BY_NAME:
            return _FORMAT_BY_NAME[fmt]
        raise ConfigError(f"format={fmt!r} is not one of {FORMATS}; pass one of them or None "
                          "(from the suffix or the content; knob data-format).")
    suffix = path.suffix.lower()
    if suffix in _SUFFIX_FORMAT:
        return _SUFFIX_FORMAT[suffix]
    return sniff_format(_read_text(path) if content is None else content)


def _read_text(path: Path) -> str:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); re-encode it as UTF-8.") from e


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
                f"{what}={spec!r} names a column but {path} has no header; pass a 0-based column "
                "index, or data-header='yes' if the first row is one."
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
    first: Sequence[str], following: Sequence[Sequence[str]], requested: Sequence[str],
    label_idx: int | None,
) -> bool:
    cells = [c.strip() for c in first]
    if any(r in cells for r in requested):
        return True
    if cells and all(c.lower() in _HEADER_NAMES for c in cells):
        return True
    if label_idx is None or len(cells) <= label_idx:
        return False
    labels = [row[label_idx].strip() for row in following if len(row) > label_idx]
    if not labels:
        return False
    if not _is_int(cells[label_idx]) and all(_is_int(v) for v in labels):
        return True
    # a first row of short names whose "label" no later row uses, while the later rows use
    # few labels: a header (a data row's text cell is rarely a short identifier)
    distinct = set(labels)
    return (all(len(c) <= HEADER_CELL_CHARS and " " not in c for c in cells)
            and cells[label_idx] not in distinct and len(distinct) <= max(2, len(labels) // 2))


def _infer_columns(rows: Sequence[Sequence[str]], task: Task,
                   user: int | None = None) -> tuple[int, int | None]:
    """(text, label) column indices of a headerless table whose columns were not given
    (``user``: the user column's index, never the text)."""
    width = min((len(r) for r in rows), default=0)
    if task != "classification":
        candidates = [i for i in range(width) if i != user]
        if not candidates:
            return 0, None
        mean_len = {i: statistics.fmean(len(r[i]) for r in rows) for i in candidates}
        return max(candidates, key=lambda i: (mean_len[i], -i)), None
    if width < 2:
        return 0, 1
    distinct = [len({r[i].strip() for r in rows}) for i in range(width)]
    lengths = [statistics.fmean(len(r[i]) for r in rows) for i in range(width)]
    label = min(range(width), key=lambda i: (distinct[i], i))
    if label == 1 or distinct[label] >= distinct[1] or lengths[1] <= lengths[label]:
        return 0, 1  # nothing says the usual layout is wrong
    others = [i for i in range(width) if i != label]
    return max(others, key=lambda i: (lengths[i], -i)), label


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
    path: Path, fmt: Format, spec: FileSpec, task: Task, content: str, tsv_quoting: TsvQuoting,
    layout: dict[str, object],
) -> Iterator[_Row]:
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
    classify = task == "classification"
    text_column, label_column, user_column = spec.text_column, spec.label_column, spec.user_column
    requested = [c for c in (text_column, label_column, user_column) if isinstance(c, str)]
    sample = [r for _, r in rows[1:SNIFF_LINES + 1]]
    guess_text, guess_label = _infer_columns(sample or [rows[0][1]], task,
                                             user_column if isinstance(user_column, int) else None)
    has_header = spec.has_header
    if has_header is None:
        label_guess = (label_column if isinstance(label_column, int) else
                       None if isinstance(label_column, str) else guess_label)
        has_header = _looks_like_header(rows[0][1], sample, requested, label_guess)
    header = [c.strip() for c in rows[0][1]] if has_header else None
    body = rows[1:] if has_header else rows
    if not body:
        raise DataError(f"{path} has no examples (only a header); pass a file with rows.")
    ti = _column_index(text_column, header, TEXT_COLUMN_NAMES, guess_text, "data-text-column",
                       path)
    li: int | None = None
    if classify:
        li = _column_index(label_column, header, LABEL_COLUMN_NAMES,
                           guess_label if guess_label is not None else 1, "data-label-column",
                           path)
        if ti == li:
            raise DataError(f"data-text-column and data-label-column are both column {ti} of "
                            f"{path}; pass distinct columns.")
    ui = None if user_column is None else _column_index(user_column, header, (), -1,
                                                         "data-user-column", path)
    if ui is not None and ui in (ti, li):
        raise DataError(f"data-user-column is column {ui} of {path}, which is also the text or "
                        "label column; pass a distinct column.")
    need = max(i for i in (ti, li, ui) if i is not None)
    layout.update(header=bool(has_header), columns=len(rows[0][1]),
                  header_names=header, text=ti, label=li, user=ui)
    for lineno, row in body:
        if len(row) <= need:
            raise DataError(
                f"{path}: line {lineno} has {len(row)} column(s), needs text (column {ti})"
                + (f", label (column {li})" if li is not None else "")
                + (f", user (column {ui})" if ui is not None else "")
                + "; fix or remove the row (or set data-text-column / data-label-column)."
            )
        yield (lineno, row[ti], "" if li is None else row[li],
               None if ui is None else row[ui].strip())


def _json_key(
    obj: dict[str, object], spec: str | None, defaults: Sequence[str], what: str, path: Path, lineno: int,
) -> str:
    key = spec if spec is not None else next((k for k in defaults if k in obj), None)
    if key is None or key not in obj:
        raise DataError(
            f"{path}: line {lineno} has no {what} {key!r}; available columns: {list(obj)}. "
            f"Set {what} to one of them."
        )
    return key


def _chat_messages(value: object, path: Path, lineno: int) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{path}: line {lineno}: 'messages' must be a non-empty list of "
                        "{'role', 'content'} objects.")
    out: list[dict[str, str]] = []
    for j, m in enumerate(value):
        if (not isinstance(m, dict) or m.get("role") not in CHAT_ROLES
                or not isinstance(m.get("content"), str)):
            raise DataError(f"{path}: line {lineno}: message {j} must be an object with 'role' "
                            f"(one of {CHAT_ROLES}) and a string 'content'; got {m!r:.80}.")
        out.append({"role": str(m["role"]), "content": str(m["content"])})
    if not any(m["content"].strip() for m in out):
        raise DataError(f"{path}: line {lineno}: every message is empty; fix or remove the row.")
    return out


def _read_jsonl(path: Path, spec: FileSpec, task: Task, content: str,
                render_chat: RenderChat | None) -> Iterator[_Row]:
    columns = (spec.text_column, spec.label_column, spec.user_column)
    if any(isinstance(c, int) for c in columns):
        raise DataError(f"{path} is JSON lines: set data-text-column / data-label-column / "
                        "data-user-column to key names, not indices.")
    text_key = spec.text_column if isinstance(spec.text_column, str) else None
    label_key = spec.label_column if isinstance(spec.label_column, str) else None
    user_key = spec.user_column if isinstance(spec.user_column, str) else None
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({e}); fix or remove it.") from e
        except RecursionError as e:
            raise DataError(f"{path}: line {lineno} nests too deeply; fix or remove it.") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {lineno} is not a JSON object; each line must be one object.")
        user = None
        if user_key is not None:
            if user_key not in obj:
                raise DataError(f"{path}: line {lineno} has no data-user-column {user_key!r}; "
                                f"available: {list(obj)}.")
            user = "" if obj[user_key] is None else str(obj[user_key]).strip()
        if task != "classification" and text_key is None and "messages" in obj:
            if render_chat is None:
                raise DataError(f"{path}: line {lineno} is a chat ('messages'); it needs the "
                                "model's chat template (load it through the run config).")
            text = render_chat(_chat_messages(obj["messages"], path, lineno))
            yield lineno, text, "", user
            continue
        tk = _json_key(obj, text_key, TEXT_COLUMN_NAMES, "data-text-column", path, lineno)
        label = ""
        if task == "classification":
            lk = _json_key(obj, label_key, LABEL_COLUMN_NAMES, "data-label-column", path, lineno)
            label = "" if obj[lk] is None else str(obj[lk])
        text = obj[tk]
        yield lineno, "" if text is None else str(text), label, user


def _read_lines(content: str) -> Iterator[_Row]:
    for lineno, line in enumerate(content.splitlines(), start=1):
        if line.strip():
            yield lineno, line, "", None


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


def read_rows(path: str | os.PathLike[str], spec: FileSpec, task: Task, *,
              render_chat: RenderChat | None = None, tsv_quoting: TsvQuoting = "auto",
              layout: dict[str, object] | None = None) -> tuple[Format, list[_Row]]:
    """The format and the raw ``(line, text, label, user)`` rows of a file (no label mapping);
    ``layout`` (if given) receives what was detected: header, columns used."""
    layout = {} if layout is None else layout
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingDataError(
            f"path={str(p)!r} does not exist or is not a file (searched: {p.resolve()}); pass an existing "
            "file, or use fedpeft.data.paths.shared_data_path(name) with FEDPEFT_DATA_DIR set."
        )
    if tsv_quoting not in TSV_QUOTINGS:
        raise ConfigError(f"tsv_quoting={tsv_quoting!r} is not one of {TSV_QUOTINGS}; pick one of them.")
    content = _read_text(p)
    fmt = _infer_format(p, spec.format, content)
    if fmt == "text":
        if task == "classification":
            raise DataError(f"{p} reads as plain text (one example per line), which has no "
                            "labels; set data-format to tsv, csv or jsonl for a classification "
                            "file.")
        if spec.user_column is not None:
            raise DataError(f"{p} is plain text: it has no columns, so data-user-column="
                            f"{spec.user_column!r} cannot be read; use a TSV / CSV / JSON-lines "
                            "file with a user column.")
        rows = list(_read_lines(content))
    elif fmt == "jsonl":
        rows = list(_read_jsonl(p, spec, task, content, render_chat))
    else:
        rows = list(_read_delimited(p, fmt, spec, task, content, tsv_quoting, layout))
    layout["format"] = fmt
    if not rows:
        raise DataError(f"{p} has no examples (only a header or blank lines); pass a file with rows.")
    return fmt, rows


def load_file(
    path: str | os.PathLike[str],
    spec: FileSpec,
    task: Task,
    *,
    render_chat: RenderChat | None = None,
    name: str | None = None,
    tsv_quoting: TsvQuoting = "auto",
    layout: dict[str, object] | None = None,
) -> Corpus:
    """A classification or causal-LM corpus from a local file (see the module docstring);
    ``layout`` (if given) receives the format, header and columns detected."""
    p = Path(path).expanduser()
    layout = {} if layout is None else layout
    _, rows = read_rows(p, spec, task, render_chat=render_chat, tsv_quoting=tsv_quoting,
                        layout=layout)
    texts: list[str] = []
    raw_labels: list[str] = []
    users: list[str | None] = []
    for lineno, text, label, user in rows:
        text, label = text.strip(), label.strip()
        if not text:
            raise DataError(f"{p}: line {lineno} has an empty text; fix or remove the row.")
        if task == "classification" and not label:
            raise DataError(f"{p}: line {lineno} has an empty label; fix or remove the row.")
        if user is not None and not user:
            raise DataError(f"{p}: line {lineno} has an empty user (data-user-column); fix or "
                            "remove the row.")
        texts.append(text)
        raw_labels.append(label)
        users.append(user)
    corpus_name = name if name is not None else p.stem
    if task != "classification":
        return Corpus(tuple(TextExample(t, None, u) for t, u in zip(texts, users, strict=True)),
                      None, "causal_lm", corpus_name)
    distinct = len(set(raw_labels))
    if spec.label_names is None and len(raw_labels) >= 20 and distinct > len(raw_labels) // 2:
        col = layout.get("label")
        raise DataError(
            f"{p}: the label column{'' if col is None else f' (column {col})'} has {distinct} "
            f"distinct values in {len(raw_labels)} rows: it looks like text, not labels; set "
            "data-label-column to the label column (`fedpeft data inspect FILE` shows them)")
    mapping, names = _label_mapping(raw_labels, spec.label_names, p)
    examples = tuple(TextExample(t, mapping[lab], u)
                     for t, lab, u in zip(texts, raw_labels, users, strict=True))
    return Corpus(examples, names, "classification", corpus_name)


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
    user_column: str | int | None = None,
) -> Corpus:
    """Classification corpus from a local file (see the module docstring for the rules)."""
    if label_names is not None and (isinstance(label_names, str) or len(label_names) == 0):
        raise ConfigError(f"label_names={label_names!r} must be a non-empty sequence of strings.")
    if format is not None and format not in _FORMAT_BY_NAME:
        raise ConfigError(f"format={format!r} is not one of {FORMATS}; pass one of them or None "
                          "(from the suffix or the content; knob data-format).")
    spec = FileSpec(format=format, text_column=text_column, label_column=label_column,
                    user_column=user_column,
                    label_names=None if label_names is None else tuple(label_names),
                    header={None: "auto", True: "yes", False: "no"}[has_header])
    return load_file(path, spec, "classification", name=name, tsv_quoting=tsv_quoting)


@dataclass(frozen=True)
class FileSummary:
    """What :func:`load_file` reads from a file (``fedpeft data inspect``)."""

    path: str
    format: str
    task: str
    rows: int
    label_counts: dict[str, int]
    users: int
    examples_per_user: tuple[int, int, float, int] | None  # min, median, mean, max
    duplicate_texts: int
    first_rows: tuple[TextExample, ...]


def summarize(path: str | os.PathLike[str], corpus: Corpus, fmt: str) -> FileSummary:
    """Counts a user checks before a federation runs on ``corpus`` (read from ``path``)."""
    labels: dict[str, int] = {}
    if corpus.task == "classification" and corpus.label_names is not None:
        counts = Counter(corpus.labels)
        labels = {corpus.label_names[i]: counts.get(i, 0) for i in range(len(corpus.label_names))}
    per_user = Counter(u for u in corpus.users if u is not None)
    sizes = sorted(per_user.values())
    stats = (None if not sizes else
             (sizes[0], int(statistics.median_low(sizes)), statistics.fmean(sizes), sizes[-1]))
    texts = Counter(corpus.texts)
    return FileSummary(path=str(path), format=fmt, task=corpus.task, rows=len(corpus),
                       label_counts=labels, users=len(per_user), examples_per_user=stats,
                       duplicate_texts=sum(c - 1 for c in texts.values() if c > 1),
                       first_rows=corpus.examples[:5])
