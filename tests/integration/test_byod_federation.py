"""Bring your own data end to end (issue 21): a raw file with a user column, read through the
``data-*`` knobs that `fedpeft data inspect` prints, becomes a federation of one client per
user that trains under record-level DP inside SecAgg+ (MiniLM cut to 2 layers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.cli.data_inspect import inspect_lines
from fedpeft.coordinator.server import Coordinator
from fedpeft.runconfig.config import parse_run_config
from fedpeft.simulations.inmemory import InMemoryTransport
from tests.conftest import tiny_flat

pytestmark = pytest.mark.integration

GOOD = ["a wonderful film", "truly great acting", "i loved every minute", "moving and funny"]
BAD = ["a dull mess", "terrible pacing", "i hated it", "boring and long"]


def _raw_file(path: Path, users: int = 7) -> Path:
    """No suffix, no header, columns: user, text, label word (a layout no default reads)."""
    lines = []
    for u in range(users):
        for j in range(8 + u):
            label = (u + j) % 2
            text = (GOOD if label else BAD)[(u * 3 + j) % 4]
            lines.append(f"u{u:02d}\t{text} (note {j} by u{u:02d})\t{'pos' if label else 'neg'}")
    lines.append("u06\t" + "a very long review " * 12 + "\tpos")  # > 32 tokens
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_raw_file_with_users_trains_a_private_federation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = _raw_file(tmp_path / "reviews")
    lines = inspect_lines(str(raw), "classification",
                          {"data-user-column": "0", "data-label-column": "2"})
    flags = lines[-1].split()
    sets = dict(flags[i + 1].split("=", 1) for i in range(0, len(flags), 2))
    assert sets["data-format"] == "tsv" and sets["data-text-column"] == "1"
    assert sets["partitioner"] == "natural" and sets["num-labels"] == "2"
    flat = tiny_flat(**{**sets, "run-dir": str(tmp_path / "run"), "model": "minilm-l6",
                        "num-rounds": 1, "local-steps": 2, "batch-size": 4,
                        "max-examples-per-client": 16, "eval-examples": 16, "lr": 0.05,
                        "secagg": True, "weighting": "uniform", "dp": True,
                        "dp-target-epsilon": 8.0, "min-clients": 3,
                        "secagg-dropout": 0.2, "secagg-max-abort": 0.5})
    run = parse_run_config(flat)
    assert run.model.num_labels == 2 and run.data.user_column == "0"
    summary = Coordinator(run, InMemoryTransport(run, 4), tmp_path / "run").run_federation()
    assert not summary.stopped_reason and summary.rounds_completed == 1
    # rows beyond max-length are counted and said before round 1 (tiny_flat: 32 tokens)
    err = capsys.readouterr().err
    assert "1 of its 78 rows and 0 of the 16 evaluation rows are longer than max-length=32" in err
    assert "0 rows repeat an earlier text" in err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["secagg"]["survivors"] == 4 and rows[1]["dp_spent"] == 4
    # one client per user: each client's example count is its user's row count (15, 13, ...)
    assert [c["num-examples"] for c in rows[1]["clients"]] == [15, 13, 12, 11]
    # the four largest users are the clients; the three others are the held-out evaluation
    runtimes = InMemoryTransport(run, 4).runtimes
    owners = [{ex.user for ex in _corpus(rt)} for rt in runtimes.values()]
    assert owners == [{"u06"}, {"u05"}, {"u04"}, {"u03"}]


def _corpus(rt: object) -> list:  # type: ignore[type-arg]
    from fedpeft.data.federation import client_corpus

    run = rt.run  # type: ignore[attr-defined]
    ident = rt.identity  # type: ignore[attr-defined]
    return list(client_corpus(run.data, ident.partition_id, ident.num_partitions,
                              run.seed).examples)
