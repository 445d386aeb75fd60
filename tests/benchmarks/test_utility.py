"""The utility sweep (benchmarks/utility): its grid, its table, and a smoke run end to end."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.utility.cell import summarise_run
from benchmarks.utility.grid import SIZES, SST2_DP, Cell, grid
from benchmarks.utility.table import markdown
from fedpeft.core.errors import ConfigError
from fedpeft.data.paths import data_available
from fedpeft.runconfig.config import DEFAULTS, parse_run_config
from fedpeft.runconfig.presets import get_preset

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_cell_is_a_valid_run_config(size: str) -> None:
    cells = grid(size)
    for group in {c.group for c in cells}:  # within a table no two rows are the same run
        keys = [c.key for c in cells if c.group == group]
        assert len(set(keys)) == len(keys)
    for c in cells:
        run = parse_run_config({**DEFAULTS, **get_preset(c.preset).config, **c.overrides,
                                "seed": c.seed})
        # DP on exactly where a target is set, bar the diagnosis table's clip-only row
        clip_only = c.group == "sst2-limits" and run.dp.noise_multiplier is not None
        assert run.dp.enabled == (c.epsilon is not None or clip_only)
        if clip_only:
            assert c.label.startswith("clip only") and "not private" in c.label
        if c.epsilon is not None:
            assert run.dp.target_epsilon == c.epsilon and run.dp.epsilon_max == c.epsilon
        if c.clients > 1:
            assert run.secagg is not None  # every federated cell is securely aggregated


def test_small_sweep_covers_the_issue_grid() -> None:
    cells = grid("small")
    main = {(c.label, c.seed) for c in cells if c.group == "sst2-main"}
    for alpha in ("0.5", "100"):
        for eps in ("epsilon 1", "epsilon 3", "epsilon 8", "no DP"):
            assert (f"alpha {alpha}, {eps}", 0) in main
    assert ("centralised, no DP", 0) in main
    assert SIZES["small"].sst2_clients >= 10
    central = next(c for c in cells if c.label == "centralised, no DP")
    fed = next(c for c in cells if c.label == "alpha 0.5, no DP")
    # the centralised reference processes as many examples as the federation
    assert (int(central.overrides["local-steps"]) * central.clients
            == int(fed.overrides["local-steps"]) * fed.clients)
    techniques = {c.label for c in cells if c.group == "sst2-technique"}
    assert any("FFA-LoRA" in t for t in techniques) and len(techniques) >= 5
    chat = {c.label for c in cells if c.group == "chat"}
    assert chat == {"LoRA, epsilon 8", "LoRA, no DP", "FFA-LoRA, epsilon 8", "FFA-LoRA, no DP",
                    "soft prompt, epsilon 8", "soft prompt, no DP"}
    assert max(c.seed for c in cells) >= 2  # at least three seeds somewhere


def test_methods_table_pairs_each_method_with_its_own_non_private_run() -> None:
    """The LoRA rows are exactly the main table's alpha 0.5 cells (same key); every other
    method changes only ``method``; the gap is to the same method without DP."""
    from benchmarks.utility.table import _reference

    cells = grid("small")
    by_label = {c.label: c for c in cells if c.group == "sst2-methods"}
    lora = [by_label.pop("LoRA (FFA-LoRA under DP), epsilon 8"),
            by_label.pop("LoRA (FFA-LoRA under DP), no DP")]
    methods = [*lora, *by_label.values()]
    main = {c.label: c for c in cells if c.group == "sst2-main" and c.seed == 0}
    assert methods[0].key == main["alpha 0.5, epsilon 8"].key
    assert methods[1].key == main["alpha 0.5, no DP"].key
    own = ("method", "bottleneck-placement")  # what a method row sets of its own
    for c in methods[2:]:
        twin = methods[0] if c.epsilon else methods[1]
        assert ({k: v for k, v in c.overrides.items() if k not in own}
                == {k: v for k, v in twin.overrides.items() if k not in own})
    assert {c.overrides.get("method") for c in methods[2:]} == {"ia3", "bitfit", "bottleneck"}
    assert {c.overrides.get("bottleneck-placement") for c in methods[2:]} == {None, "parallel"}
    rows = [{"group": c.group, "label": c.label, "final": 0.5 + i / 10}
            for i, c in enumerate(methods)]
    from benchmarks.utility.table import group_rows

    ia3_no_dp = next(i for i, c in enumerate(methods) if c.label == "(IA)3, no DP")
    assert _reference(group_rows(rows), "sst2-methods", "(IA)3, epsilon 8") \
        == pytest.approx(0.5 + ia3_no_dp / 10)
    assert not [c for c in grid("smoke") if c.group == "sst2-methods"]  # not in CI


def test_limits_table_varies_the_main_private_cell() -> None:
    """The diagnosis rows vary the main table's alpha 100, epsilon 8 run aggregated by plain
    FedAvg with SecAgg's clamp at 1; two rows restore one of those two default settings each."""
    cells = grid("small")
    limits = [c for c in cells if c.group == "sst2-limits"]
    main = next(c for c in cells if c.group == "sst2-main" and c.seed == 0
                and c.label == "alpha 100, epsilon 8")
    assert limits[0].overrides == {**main.overrides, "aggregation": "fedavg", "secagg-clip": 1.0}
    assert limits[1].overrides == {**main.overrides, "secagg-clip": 1.0}
    assert limits[2].overrides == {**main.overrides, "aggregation": "fedavg"}
    assert len({c.key for c in limits}) == len(limits) >= 8
    assert all(c.seed == 0 for c in limits)
    assert not [c for c in grid("smoke") if c.group == "sst2-limits"]  # not in CI


def test_private_cells_use_the_preset_defaults() -> None:
    """The main table's private rows measure what the sst2-lora preset ships."""
    preset = get_preset("sst2-lora").config
    assert {k: preset.get(k, DEFAULTS[k]) for k in SST2_DP} == SST2_DP


def test_bad_grid_requests_are_named() -> None:
    with pytest.raises(ConfigError, match="unknown sweep size 'huge'"):
        grid("huge")
    with pytest.raises(ConfigError, match="unknown sweep part"):
        grid("smoke", ("sst2", "imagenet"))
    with pytest.raises(ConfigError, match="seeds=0"):
        grid("smoke", seeds=0)


def test_cell_key_changes_with_what_it_computes() -> None:
    a = Cell("g", "x", "sst2-lora", 10, 0, {"lr": 0.1})
    assert a.key == Cell("g", "renamed", "sst2-lora", 10, 0, {"lr": 0.1}).key
    assert a.key != Cell("g", "x", "sst2-lora", 10, 1, {"lr": 0.1}).key
    assert a.key != Cell("g", "x", "sst2-lora", 10, 0, {"lr": 0.2}).key
    assert a.key != Cell("g", "x", "chat-lora", 10, 0, {"lr": 0.1}).key


def test_cell_key_is_the_resolved_run_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spelling out a preset's or a default's value is the same run; retuning the preset
    behind a cell retires its stored result."""
    preset = get_preset("sst2-lora")
    a = Cell("g", "x", "sst2-lora", 10, 0, {})
    assert a.key == Cell("g", "x", "sst2-lora", 10, 0,
                         {"lr": preset.config["lr"], "weight-decay": DEFAULTS["weight-decay"]}).key
    pinned = Cell("g", "x", "sst2-lora", 10, 0, {"lr": 0.3})
    before = a.key, pinned.key
    monkeypatch.setitem(preset.config, "lr", 0.123)
    assert a.key != before[0]  # the preset change reaches the unpinned cell
    assert pinned.key == before[1]  # and not the one that overrides it


def test_server_knobs_the_aggregation_ignores_do_not_change_the_key() -> None:
    a = Cell("g", "x", "sst2-lora", 10, 0, {"aggregation": "fedavg"})
    assert a.key == Cell("g", "x", "sst2-lora", 10, 0, {"aggregation": "fedavg",
                                                       "server-momentum": 0.1,
                                                       "beta1": 0.5}).key
    m = Cell("g", "x", "sst2-lora", 10, 0, {"aggregation": "fedavgm", "server-momentum": 0.5})
    assert m.key != Cell("g", "x", "sst2-lora", 10, 0, {"aggregation": "fedavgm",
                                                       "server-momentum": 0.9}).key
    assert m.key == Cell("g", "x", "sst2-lora", 10, 0, {"aggregation": "fedavgm",
                                                       "server-momentum": 0.5, "tau": 0.1}).key


def test_secagg_knobs_of_a_run_without_secagg_do_not_change_the_key() -> None:
    plain = Cell("g", "x", "sst2-lora", 1, 0, {"secagg": False})
    assert plain.key == Cell("g", "x", "sst2-lora", 1, 0, {"secagg": False, "secagg-clip": 3.0,
                                                          "secagg-bits": 24}).key
    secure = Cell("g", "x", "sst2-lora", 10, 0, {"secagg": True})
    assert secure.key != Cell("g", "x", "sst2-lora", 10, 0, {"secagg": True,
                                                           "secagg-clip": 3.0}).key


def test_a_later_key_at_its_neutral_value_keeps_stored_keys(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """A knob added with a behaviour-preserving default leaves stored cells valid; any other
    value of it is a different run."""
    from benchmarks.utility import grid as grid_module

    a = Cell("g", "x", "sst2-lora", 10, 0, {"lr": 0.1})
    decayed = Cell("g", "x", "sst2-lora", 10, 0, {"lr": 0.1, "lr-final-fraction": 0.1}).key
    assert decayed != a.key
    assert Cell("g", "x", "sst2-lora", 10, 0, {"lr": 0.1, "lr-final-fraction": 1.0}).key == a.key
    neutral = a.key
    monkeypatch.setattr(grid_module, "NEUTRAL_LATER_KEYS", {})
    assert a.key != neutral  # without the entry the new key would have retired every cell


def _row(label: str, final: float, seed: int, eps: float | None) -> dict[str, object]:
    return {"group": "sst2-main", "label": label, "seed": seed, "initial": 0.5, "final": final,
            "target_epsilon": eps, "epsilon": eps, "sigma": [1.25] if eps else [],
            "upload_bytes_per_client_round": 300_000.0, "round_seconds": 10.0}


def test_table_known_answer() -> None:
    rows = [_row("alpha 0.5, epsilon 8", 0.80, 0, 8.0), _row("alpha 0.5, epsilon 8", 0.82, 1, 8.0),
            _row("alpha 0.5, no DP", 0.85, 0, None), _row("alpha 0.5, no DP", 0.87, 1, None)]
    text = markdown(rows)
    line = next(x for x in text.splitlines() if x.startswith("| alpha 0.5, epsilon 8"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "2"  # seeds
    assert cells[3] == "81.0 ± 1.4"  # mean ± sample sd in %
    assert cells[4] == "-5.0"  # gap to the non-private federated run, same alpha
    assert cells[5] == "8.00" and cells[6] == "1.25" and cells[7] == "300 KB"
    assert "Yu et al., ICLR 2022" in text and "92.3 at epsilon 8" in text
    tech = [dict(r, group="sst2-technique", label=lab, final=f) for r, lab, f in
            ((rows[0], "default", 0.80), (rows[0], "variant", 0.83))]
    line = next(x for x in markdown(tech).splitlines() if x.startswith("| variant"))
    assert [c.strip() for c in line.strip("|").split("|")][4] == "+3.0"  # against the default
    limits = [dict(rows[0], group="sst2-limits", label="default", final=0.80),
              dict(rows[2], group="sst2-limits", label="no DP", final=0.84),
              dict(rows[0], group="sst2-limits", label="clip only", final=0.81,
                   target_epsilon=None, epsilon=3.3e9)]
    text = markdown(limits)
    cols = {x.split("|")[1].strip(): [c.strip() for c in x.strip("|").split("|")]
            for x in text.splitlines() if x.startswith("| ") and "run" not in x}
    assert cols["default"][4] == "-"  # the reference itself
    assert cols["no DP"][4] == "+4.0"  # non-private rows get a gap in this table
    assert cols["clip only"][5] == "3.3e+09 (not private)"


def test_summarise_run_reads_metrics(tmp_path: Path) -> None:
    rows = [{"round": 0, "eval": {"accuracy": 0.5}},
            {"round": 1, "eval": {"accuracy": 0.6}, "ok": 2, "bytes_up": 2000, "seconds": 3.0,
             "dp_epsilon": {"min": 1.0, "median": 1.5, "max": 2.0},
             "clients": [{"dp-sigma": 1.1}, {"dp-sigma": 1.1}],
             "secagg": {"survivors": 2, "clipped": 5, "clients_clipped": 1}},
            {"round": 2, "eval": {"accuracy": 0.7}, "ok": 1, "bytes_up": 1000, "seconds": 5.0,
             "skipped": "x", "dp_epsilon": {"min": 2.0, "median": 2.5, "max": 3.0}}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = summarise_run(tmp_path)
    assert s["metric"] == "accuracy" and s["initial"] == 0.5 and s["final"] == 0.7
    assert s["curve"] == [0.5, 0.6, 0.7] and s["rounds"] == 2 and s["skipped"] == 1
    assert s["epsilon"] == 3.0 and s["sigma"] == [1.1]
    assert s["upload_bytes_per_client_round"] == 1000.0 and s["round_seconds"] == 4.0
    assert s["secagg_clipped"] == 5  # round 2 has no secagg record: it counts nothing


@pytest.mark.integration
@pytest.mark.slow
def test_smoke_sweep_end_to_end(tmp_path: Path) -> None:
    """The CI version of the sweep: every part runs, DP cells stay within their epsilon."""
    results = tmp_path / "utility-smoke.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.utility", "--size", "smoke",
                           "--results", str(results)], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(results.read_text())
    rows = list(doc["cells"].values())
    expected = grid("smoke", ("sst2", "chat") if data_available("sst2_train.tsv")
                    and data_available("sst2_dev.tsv") else ("chat",))
    assert {r["key"] for r in rows} == {c.key for c in expected}
    for r in rows:
        assert r["rounds"] >= 1 and r["skipped"] == 0
        if r["target_epsilon"] is not None:
            assert 0 < r["epsilon"] <= r["target_epsilon"] and r["sigma"]
        else:
            assert r["epsilon"] is None
        if r["clients"] > 1:
            assert r["upload_bytes_per_client_round"] > 0  # masked updates travelled
    assert "| run |" in results.with_suffix(".md").read_text()
    # a second invocation reuses every finished cell
    again = subprocess.run([sys.executable, "-m", "benchmarks.utility", "--size", "smoke",
                            "--results", str(results)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and f"{len(rows)} already done, 0 to run" in again.stdout
    # the tables alone, from what is stored, run nothing
    table = subprocess.run([sys.executable, "-m", "benchmarks.utility", "--size", "smoke",
                            "--results", str(results), "--table-only"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and "to run" not in table.stdout and "| run |" in table.stdout


def test_results_page_shows_the_stored_tables() -> None:
    """docs/results.md quotes the sweep's own table file, unedited."""
    page = (ROOT / "docs" / "results.md").read_text()
    start, end = "<!-- tables:start -->", "<!-- tables:end -->"
    quoted = page[page.index(start) + len(start):page.index(end)].strip()
    assert quoted == (ROOT / "benchmarks" / "results" / "utility-small.md").read_text().strip()


def test_stored_results_are_found_after_later_knobs() -> None:
    """A knob added after results were stored must not orphan them: every cell of the stored
    small sweep and of the stored methods part is found (directly or by its legacy key), so
    ``--table-only`` reproduces the tables docs/results.md quotes."""
    from benchmarks.utility.grid import rekey

    root = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    main = json.loads((root / "utility-small.json").read_text())["cells"]
    cells = [c for c in grid("small") if c.group not in ("sst2-methods", "sst2-sentences")]
    rekey(main, cells)
    assert [c.label for c in cells if c.key not in main] == []
    stored = json.loads((root / "utility-methods.json").read_text())["cells"]
    methods = grid("small", only=("methods",))
    moved = rekey(stored, methods)
    assert moved >= 0 and [c.label for c in methods if c.key not in stored] == []
    assert all(stored[c.key]["key"] == c.key for c in methods)


def test_a_new_knob_at_its_neutral_value_keeps_the_key_and_any_other_value_changes_it() -> None:
    c = next(c for c in grid("small") if c.group == "sst2-main" and c.epsilon)
    base = c.key
    assert dataclasses.replace(c, overrides={**c.overrides, "bottleneck-size": 8}).key == base
    assert dataclasses.replace(c, overrides={**c.overrides, "batch-clients": 2}).key != base
    # a corrupt fraction that tolerates no colluder at this size plans the same round
    assert dataclasses.replace(c, overrides={**c.overrides,
                                             "secagg-corrupt-fraction": 0.01}).key == base
    assert dataclasses.replace(c, overrides={**c.overrides,
                                             "secagg-corrupt-fraction": 0.5}).key != base


def test_sentence_cells_are_the_main_runs_evaluated_on_full_sentences() -> None:
    from benchmarks.utility.table import _reference, group_rows

    cells = grid("small")
    main = {(c.label, c.seed): c for c in cells if c.group == "sst2-main"}
    every = [c for c in cells if c.group == "sst2-sentences"]
    assert sorted((c.seed, bool(c.epsilon)) for c in every) == [
        (s, e) for s in range(3) for e in (False, True)]  # three seeds, like the main rows
    sentences = [c for c in every if c.seed == 0]
    for c in every:
        twin = main[("alpha 0.5, epsilon 8" if c.epsilon else "alpha 0.5, no DP", c.seed)]
        assert {k: v for k, v in c.overrides.items() if k != "eval-subset"} == twin.overrides
        assert c.overrides["eval-subset"] == "sentences" and c.key != twin.key
    rows = [{"group": c.group, "label": c.label, "final": 0.7 if c.epsilon else 0.8}
            for c in sentences]
    assert _reference(group_rows(rows), "sst2-sentences",
                      "alpha 0.5, full sentences, epsilon 8") == pytest.approx(0.8)
