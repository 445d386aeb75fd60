from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.cli.main import main
from fedpeft.core.errors import DataError
from fedpeft.report.run_report import write_report


def _run_dir(tmp_path: Path) -> Path:
    rows = [{"round": 0, "eval": {"loss": 4.3, "perplexity": 70.7}},
            {"round": 1, "eval": {"loss": 4.2, "perplexity": 66.7}, "ok": 5, "selected": 5,
             "bytes_up": 9_222_875, "bytes_down": 9_305_120, "seconds": 59.6,
             "dp_epsilon": {"min": 5.7, "median": 5.7, "max": 5.8}, "dp_exhausted": 0,
             "secagg": {"survivors": 5, "clipped": 7, "clients_clipped": 2}},
            {"round": 2, "eval": {"loss": 4.2, "perplexity": 66.7}, "ok": 1, "selected": 5,
             "skipped": "1 usable updates < min-clients 2; global adapter unchanged",
             "seconds": 12.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run_config.json").write_text(json.dumps(
        {"run_config": {"preset": "chat-lora", "model": "smollm2-135m", "method": "lora",
                        "dp": True, "secagg": True, "secagg-clip": 1.0}}))
    return tmp_path


def test_report_lists_rounds_plots_and_config(tmp_path: Path) -> None:
    out = write_report(_run_dir(tmp_path))
    text = out.read_text()
    assert ("| 1 | 66.7000 | 4.2000 | 5/5 | 5.70/5.70/5.80 | 0 | 9.223 | 9.305 | 59.6 | 7 (2) |"
            in text)
    assert "| 2 | 66.7000 | 4.2000 | 1/5 | - | - | 0.000 | 0.000 | 12.0 | - |" in text
    assert "secagg-clip=`1.0` in rounds 1:" in text
    assert "round 2: 1 usable updates" in text and "DP on (record level), secure aggregation on" in text
    for name in ("report_metric.png", "report_bytes.png", "report_time.png", "report_epsilon.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_cli_and_bad_input(tmp_path: Path) -> None:
    assert main(["report", str(_run_dir(tmp_path))]) == 0
    with pytest.raises(DataError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="metrics.jsonl:1"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2


def test_report_without_clipping_says_nothing_about_it(tmp_path: Path) -> None:
    rows = [{"round": 0, "eval": {"accuracy": 0.5}},
            {"round": 1, "eval": {"accuracy": 0.8}, "ok": 3, "selected": 3,
             "secagg": {"survivors": 3, "clipped": 0, "clients_clipped": 0}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(tmp_path).read_text()
    assert "| 0 (0) |" in text and "SecAgg clipped update" not in text


def test_report_reads_rounds_from_before_the_clamp_count(tmp_path: Path) -> None:
    rows = [{"round": 0, "eval": {"accuracy": 0.5}},
            {"round": 1, "eval": {"accuracy": 0.8}, "secagg": {"survivors": 3}},
            {"round": 2, "eval": {"accuracy": 0.8}, "secagg": {"clipped": "x"}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(tmp_path).read_text()
    table = [ln for ln in text.splitlines() if ln.startswith(("| 1 |", "| 2 |"))]
    assert len(table) == 2 and all(ln.endswith("| 0.0 | - |") for ln in table), table
    assert "SecAgg clipped update" not in text
