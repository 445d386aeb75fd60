"""What a DP client lets the coordinator see (2-layer SmolLM2, in-process transport).

Under DP a reply carries exactly the documented fields (docs/privacy.md, "What a client
sends"); fault details that could depend on private records stay on the device; a client
whose ledger was deleted or restored refuses to train (anchor and coordinator receipt); the
privacy report states the adjacency it accounts under.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedpeft.cli.main import print_privacy_report
from fedpeft.client.runtime import DP_REPLY_FIELDS, ClientRuntime, check_dp_reply
from fedpeft.coordinator.server import Coordinator
from fedpeft.core.errors import ClientFault, ConfigError
from fedpeft.core.protocol import LEDGER_HEAD_KEY
from fedpeft.runconfig.config import parse_run_config
from fedpeft.simulations.inmemory import InMemoryTransport
from tests.conftest import tiny_flat

pytestmark = pytest.mark.integration

#: The train reply's fields under DP, exactly (no budget set).
TRAIN_SECAGG = {"status", "client-id", "round", "num-examples", "steps", "secagg",
                "dp-epsilon", "dp-epsilon-rdp", "dp-delta", "dp-sigma", "dp-q", "dp-steps",
                "dp-rounds-joined", "dp-clip", "dp-adjacency", "dp-budget", "dp-budget-left",
                LEDGER_HEAD_KEY}
TRAIN_PLAIN = (TRAIN_SECAGG - {"secagg"}) | {"update", "update-bytes"}


def _flat(tmp: Path, **kw: object) -> dict[str, object]:
    return tiny_flat(**{"run-dir": str(tmp), "num-rounds": 2, "dp": True,
                        "dp-target-epsilon": 8.0, "batch-size": 4, "local-steps": 2,
                        "max-examples-per-client": 32, "weighting": "uniform",
                        "secagg-dropout": 0.02, **kw})


def _rows(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("secagg", [True, False])
def test_reply_keys_are_exactly_the_documented_set(tmp_path: Path, secagg: bool) -> None:
    run = parse_run_config(_flat(tmp_path, secagg=secagg))
    transport = InMemoryTransport(run, 4, record=True)
    Coordinator(run, transport, tmp_path).run_federation()
    train = [r for kind, _n, r in transport.received if kind == "train"]
    assert len(train) == 8
    for reply in train:
        assert set(reply) == (TRAIN_SECAGG if secagg else TRAIN_PLAIN), sorted(reply)
        assert reply["dp-adjacency"] == "replace_one"
    steps = [r for kind, _n, r in transport.received if kind == "secagg"]
    assert all(set(r) == {"status", "client-id", "message"} for r in steps)
    assert bool(steps) == secagg
    for rt in transport.runtimes.values():  # what stayed on the device
        assert "train-seconds" in rt.last_local
        local = (rt.state_dir() / "client-metrics.jsonl").read_text().splitlines()
        assert len(local) == 2
    if secagg:  # the clamp count travels inside the masked sum, not per client
        assert "secagg-clipped" in transport.runtimes[0].last_local
        assert isinstance(_rows(tmp_path)[1]["secagg"]["clipped"], int)  # type: ignore[index]


def test_a_reply_with_an_undocumented_field_is_not_sent() -> None:
    reply = {"status": "ok", "client-id": "c", "round": 1, "num-examples": 3, "steps": 2,
             "update": b"", "update-bytes": 0, "train-seconds": 1.5}
    with pytest.raises(ClientFault, match="train-seconds"):
        check_dp_reply(reply)  # type: ignore[arg-type]
    check_dp_reply({k: v for k, v in reply.items() if k != "train-seconds"})  # type: ignore[arg-type]
    assert DP_REPLY_FIELDS["error"] == {"status", "client-id", "reason"}


def test_fault_details_that_depend_on_data_stay_on_the_device(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    run = parse_run_config(_flat(tmp_path, lr=1e30, **{"num-rounds": 1}))
    transport = InMemoryTransport(run, 2)
    with caplog.at_level("WARNING", logger="fedpeft.client.runtime"):
        Coordinator(run, transport, tmp_path).run_federation()
    faults = _rows(tmp_path)[1]["faults"]
    assert faults, "an lr of 1e30 should make training diverge"
    for f in faults:  # type: ignore[union-attr]
        assert "step" not in f["reason"] and "nan" not in f["reason"].lower(), f
        assert f["reason"].startswith("ClientFault: details stay on the device")
    assert any("training loss became" in r.getMessage() for r in caplog.records)  # kept locally
    # without DP the same fault carries its details
    plain = parse_run_config(_flat(tmp_path / "plain", dp=False))
    rt = ClientRuntime(plain, transport.runtimes[0].identity)
    assert "at step 3" in rt.public_reason(ClientFault("training loss became nan at step 3"))
    private = transport.runtimes[0]
    assert "step" not in private.public_reason(ClientFault("training loss became nan at step 3"))
    assert "fingerprint" in private.public_reason(ConfigError("fingerprint differs"))


def _ledger_files(run_dir: Path, client: str) -> list[Path]:
    return sorted((run_dir / "ledgers").glob(f"{client}.ledger.jsonl*"))


def test_deleted_or_restored_ledger_is_refused(tmp_path: Path) -> None:
    run = parse_run_config(_flat(tmp_path, **{"num-rounds": 3, "dp-planned-rounds": 6}))
    transport = InMemoryTransport(run, 2)
    coord = Coordinator(run, transport, tmp_path)
    assert coord.run_federation().rounds_completed == 3
    backup = tmp_path / "backup"
    backup.mkdir()
    # round 4: keep a copy of client-0's ledger after round 3
    for f in _ledger_files(tmp_path, "client-0"):
        shutil.copy2(f, backup / f.name)
    run4 = parse_run_config(_flat(tmp_path, **{"num-rounds": 4, "dp-planned-rounds": 6}))
    Coordinator(run4, transport, tmp_path).run_federation()
    # 1. restore the older ledger + head pair: the anchor (and the receipt) refuse it
    for f in backup.iterdir():
        shutil.copy2(f, tmp_path / "ledgers" / f.name)
    run5 = parse_run_config(_flat(tmp_path, **{"num-rounds": 5, "dp-planned-rounds": 6}))
    Coordinator(run5, transport, tmp_path).run_federation()
    fault = _rows(tmp_path)[-1]["faults"]
    assert [f["client"] for f in fault] == ["client-0"], fault  # type: ignore[index]
    assert "LedgerRollbackError" in fault[0]["reason"]  # type: ignore[index]
    # 2. delete ledger, head and anchors (all of the device's state): the coordinator's
    # receipt still refuses a fresh ledger at epsilon 0
    for f in _ledger_files(tmp_path, "client-0"):
        f.unlink()
    shutil.rmtree(transport.runtimes[0].anchor_dir())
    transport.runtimes[0] = ClientRuntime(run5, transport.runtimes[0].identity)
    run6 = parse_run_config(_flat(tmp_path, **{"num-rounds": 6, "dp-planned-rounds": 6}))
    Coordinator(run6, transport, tmp_path).run_federation()
    fault = _rows(tmp_path)[-1]["faults"]
    assert [f["client"] for f in fault] == ["client-0"], fault  # type: ignore[index]
    assert "LedgerRollbackError" in fault[0]["reason"]  # type: ignore[index]
    fresh = tmp_path / "ledgers" / "client-0.ledger.jsonl"
    assert not fresh.exists() or '"reserve"' not in fresh.read_text()  # nothing was spent


def test_privacy_report_states_the_adjacency(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = parse_run_config(_flat(tmp_path, secagg=True))
    Coordinator(run, InMemoryTransport(run, 4), tmp_path).run_federation()
    print_privacy_report(tmp_path)
    out = capsys.readouterr().out
    assert "replace-one" in out or "replace_one" in out, out
    doc = json.loads((tmp_path / "privacy_ledgers.json").read_text())
    clients = doc["clients"] if isinstance(doc, dict) and "clients" in doc else doc
    assert all(c["adjacency"] == "replace_one" for c in clients)
    assert all(c["private_against_coordinator"] for c in clients)


def test_no_training_under_dp_is_not_reported_as_dp_off(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    # SecAgg with one client per round cannot run: the round aborts before anyone trains
    run = parse_run_config(_flat(tmp_path, secagg=True, **{"num-rounds": 1,
                                                           "min-clients": 1}))
    Coordinator(run, InMemoryTransport(run, 1), tmp_path).run_federation()
    row = _rows(tmp_path)[1]
    assert row["dp_spent"] == 0 and "no privacy was spent" in str(row["skipped"])
    print_privacy_report(tmp_path)
    out = capsys.readouterr().out
    assert "was off" not in out and "differential privacy was on" in out


def test_an_untyped_error_reports_its_type_only_under_dp(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run = parse_run_config(_flat(tmp_path))
    rt = InMemoryTransport(run, 2).runtimes[0]

    def oom(*_a: object) -> None:
        raise RuntimeError("Tried to allocate 123 MiB")

    monkeypatch.setattr(rt, "_train_round", oom)
    state = {"secagg": b"x"}
    reply = rt.handle("train", {}, state)
    assert reply["status"] == "error" and "123" not in str(reply["reason"])
    assert str(reply["reason"]).startswith("RuntimeError: details stay on the device")
    assert state == {}  # the SecAgg session is dropped
    plain = ClientRuntime(parse_run_config(_flat(tmp_path, dp=False)), rt.identity)
    monkeypatch.setattr(plain, "_train_round", oom)
    assert "123 MiB" in str(plain.handle("train", {}, {})["reason"])
