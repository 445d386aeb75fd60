"""``fedpeft data inspect FILE``: what a federation would read from a user's file (issue 21).

Reads the file exactly as a run would (the ``data-*`` knobs given with ``--set``, the rest
inferred), prints the format, header and columns it settled on, the rows, labels, users and
examples per user, duplicates, rows longer than ``max-length`` tokens, a few rows, and the
``--set`` flags that pin all of it for ``fedpeft simulate``.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpeft.core.models import load_tokenizer
from fedpeft.core.protocol import Scalar
from fedpeft.data.federation import load_data_file
from fedpeft.data.textfiles import summarize
from fedpeft.runconfig.config import DEFAULTS, parse_data_config
from fedpeft.runconfig.overrides import parse_overrides

#: The model whose tokenizer counts rows beyond ``max-length`` when ``--set model`` is absent.
DEFAULT_MODEL = {"classification": "minilm-l6", "causal_lm": "smollm2-135m"}


def add_data_parser(sub: Any) -> None:
    data = sub.add_parser("data", help="inspect a data file before a federation runs on it")
    dsub = data.add_subparsers(dest="data_command", required=True)
    ins = dsub.add_parser("inspect", help="show how FILE would be read, and the --set flags "
                                          "that reproduce it")
    ins.add_argument("file")
    ins.add_argument("--task", choices=["classification", "causal_lm"],
                     default="classification")
    ins.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                     help="data knobs (data-format, data-text-column, data-label-column, "
                          "data-user-column, data-label-names, data-header, max-length, model)")
    ins.add_argument("--rows", type=int, default=5, help="rows to show")
    ins.set_defaults(func=cmd_data_inspect)


def _column(layout: dict[str, object], key: str) -> str | None:
    index = layout.get(key)
    if not isinstance(index, int):
        return None
    names = layout.get("header_names")
    return str(names[index]) if isinstance(names, list) else str(index)


def inspect_lines(path: str, task: str, sets: Mapping[str, Scalar], rows: int = 5) -> list[str]:
    """The report ``fedpeft data inspect`` prints (one string a line)."""
    flat: dict[str, Any] = {**sets, "dataset": "file", "data-path": path, "task": task}
    data = parse_data_config(flat)
    layout: dict[str, object] = {}
    corpus = load_data_file(path, data, layout=layout)
    summary = summarize(path, corpus, str(layout.get("format")))
    model = str(sets.get("model", DEFAULT_MODEL[task]))
    max_length = int(sets.get("max-length", DEFAULTS["max-length"]))
    tokenizer = load_tokenizer(model)
    lengths = [len(ids) for ids in tokenizer(list(corpus.texts), truncation=False)["input_ids"]]
    too_long = sum(n > max_length for n in lengths)
    out = [f"file: {path}", f"format: {summary.format}  task: {task}  rows: {summary.rows}"]
    pinned: dict[str, str] = {"dataset": "file", "data-path": path, "task": task,
                              "data-format": summary.format}
    if "header" in layout:
        out.append(f"header: {'yes' if layout['header'] else 'no'}  columns: "
                   f"{layout.get('header_names') or layout.get('columns')}")
        pinned["data-header"] = "yes" if layout["header"] else "no"
    for key, knob in (("text", "data-text-column"), ("label", "data-label-column"),
                      ("user", "data-user-column")):
        col = _column(layout, key)
        if col is not None:
            out.append(f"{key} column: {col}")
            pinned[knob] = col
    for knob in ("data-text-column", "data-label-column", "data-user-column"):
        if knob not in pinned and sets.get(knob):  # JSON keys: as given
            pinned[knob] = str(sets[knob])
    if summary.label_counts:
        counts = ", ".join(f"{k}: {v}" for k, v in summary.label_counts.items())
        out.append(f"labels ({len(summary.label_counts)}): {counts}")
        pinned["num-labels"] = str(len(summary.label_counts))
        if sets.get("data-label-names"):
            pinned["data-label-names"] = str(sets["data-label-names"])
    if summary.examples_per_user is not None:
        lo, median, mean, hi = summary.examples_per_user
        out.append(f"users: {summary.users}  examples per user: min {lo}, median {median}, "
                   f"mean {mean:.1f}, max {hi}")
        pinned["partitioner"] = "natural"
    else:
        out.append("users: none (no data-user-column): partitioner iid or dirichlet")
        pinned["partitioner"] = "iid"
    out.append(f"duplicate texts: {summary.duplicate_texts}")
    out.append(f"longer than max-length={max_length} tokens ({model}): {too_long} of "
               f"{summary.rows} rows (they are truncated)")
    out.append(f"first {min(rows, len(corpus))} rows:")
    for ex in corpus.examples[:rows]:
        label = "" if ex.label is None or corpus.label_names is None else (
            f"[{corpus.label_names[ex.label]}] ")
        user = "" if ex.user is None else f"(user {ex.user}) "
        text = ex.text.replace("\n", "\\n")
        out.append(f"  {user}{label}{text[:100]}{'...' if len(text) > 100 else ''}")
    out.append("reproduce with:")
    out.append("  " + " ".join(f"--set {k}={shlex.quote(v)}" for k, v in pinned.items()))
    return out


def cmd_data_inspect(args: argparse.Namespace) -> int:
    path = str(Path(args.file).expanduser())
    for line in inspect_lines(path, args.task, parse_overrides(args.set), args.rows):
        print(line)
    return 0
