"""DP + SecAgg+ over a real deployment on loopback: TLS, SuperNode authentication, one ledger per
device, a client killed mid-round, and a coordinator restarted from its checkpoint.

Phases (one federation, one SuperLink; every process started and stopped by pid):

1. 3 SuperNodes (alice, bob, carol), 2 rounds with ``dp=true`` and ``secagg=true``: the run
   completes, the global adapter moves, each device's ledger (in its own state-dir) holds its
   2 events and agrees with the epsilon it reported, and no update reached the coordinator in
   the clear.
2. A 4th node (dave) joins; a 3-round run in a new run-dir; as soon as round 1 is in
   ``metrics.jsonl`` carol's SuperNode and warm ClientApp executor are SIGKILLed (a device
   that dies). Why 4 nodes here: SecAgg+ needs at least 3 clients to hide anyone
   (``fedpeft.secagg.config.MIN_CLIENTS``), so with 3 nodes the round after a loss could not
   run at all. With n=4 the plan is degree 3, threshold 3 (``secagg-dropout=0.02``), so the
   round with the dead node completes with 3 survivors and the next round runs without her.
3. The coordinator is started again on the same run-dir (``resume=true``, one more round): it
   resumes at round 4 from the round-3 checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.deploy.certs import CertLayout, init_cert_dir
from fedpeft.deploy.runner import (
    ClientNode,
    RunResult,
    SuperLink,
    full_run_config,
    start_client,
    start_superlink,
    submit_run,
)
from fedpeft.privacy.accounting import compute_epsilon, read_ledger
from fedpeft.runconfig.config import parse_run_config
from tests.conftest import tiny_flat

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAMES = ("alice", "bob", "carol", "dave")
NUM_PARTITIONS = len(NAMES)
ROUND_TIMEOUT = 60.0  # a dead node costs at most this per exchange
DELTA = 1e-5


def _config(run_dir: Path, **kw: object) -> dict[str, Any]:
    flat = tiny_flat(**{
        "num-rounds": 2, "dp": True, "secagg": True, "weighting": "uniform",
        "secagg-dropout": 0.02, "batch-size": 4, "local-steps": 2,
        "max-examples-per-client": 16, "round-timeout": ROUND_TIMEOUT, "dp-delta": DELTA,
        # calibrate each round's noise for 10 rounds (budget 8): the 6 rounds this test runs
        # on the same ledgers stay inside the budget
        "dp-planned-rounds": 10, **kw})
    return dict(full_run_config(flat, run_dir))


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _params(run_dir: Path, server_round: int) -> dict[str, torch.Tensor]:
    tensors = load_file(str(run_dir / "checkpoints" / f"round-{server_round:04d}"
                            / "state.safetensors"))
    return {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}


def _ledger(node: ClientNode, name: str) -> Any:
    return read_ledger(node.state_dir / f"{name}.ledger.jsonl")


def _kill(node: ClientNode) -> None:
    """SIGKILL the SuperNode and its warm executor (each leads its own process group)."""
    for proc in (node.supernode, node.worker):
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in (node.supernode, node.worker):
        if proc is not None:
            proc.wait(timeout=30)


def _submit(link: SuperLink, config: dict[str, Any], timeout: float = 300) -> RunResult:
    result = submit_run(link, config, stream=False, timeout=timeout)
    assert result.ok, (result.status, (link.run_dir / "flwr-run.log").read_text()[-3000:])
    return result


def _wait_offline(link: SuperLink, online: int, timeout: float) -> None:
    """Until the SuperLink counts exactly ``online`` nodes (a killed node's heartbeat lapses)."""
    deadline = time.monotonic() + timeout
    while link.online() != online:
        assert time.monotonic() < deadline, f"SuperLink still lists {link.online()} nodes online"
        time.sleep(2)


@pytest.fixture
def certs(tmp_path: Path) -> CertLayout:
    return init_cert_dir(tmp_path / "certs", nodes=len(NAMES), names=list(NAMES))


@pytest.fixture
def link(certs: CertLayout, tmp_path: Path) -> Iterator[SuperLink]:
    sl = start_superlink(certs.root, tmp_path / "coordinator", port=0)
    try:
        yield sl
    finally:
        sl.stop()
    assert sl.proc.poll() is not None


def test_private_secure_deployment_dropout_and_resume(link: SuperLink, certs: CertLayout,
                                                      tmp_path: Path) -> None:
    nodes: dict[str, ClientNode] = {}

    def start(name: str) -> None:
        nodes[name] = start_client(
            superlink=link.address, client_id=name, partition_id=NAMES.index(name),
            num_partitions=NUM_PARTITIONS, state_dir=tmp_path / "devices" / name,
            ca_cert=certs.ca_cert, node_key=certs.node_key(name))

    try:
        for name in NAMES[:3]:
            start(name)
        link.wait_for_nodes(3, timeout=90)
        _phase_private_secure(link, nodes, tmp_path / "run-a")
        start("dave")
        link.wait_for_nodes(4, timeout=90)
        _phase_dropout(link, nodes, tmp_path / "run-b")
        _wait_offline(link, 3, timeout=120)
        _phase_resume(link, nodes, tmp_path / "run-b")
    finally:
        for node in nodes.values():
            node.stop()
    for node in nodes.values():
        assert node.supernode.poll() is not None
        assert node.worker is not None and node.worker.poll() is not None


def _phase_private_secure(link: SuperLink, nodes: dict[str, ClientNode], run_dir: Path) -> None:
    config = _config(run_dir)
    _submit(link, config)
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert "skipped" not in row, row["skipped"]
        assert row["secagg"]["survivors"] == 3 and row["secagg"]["aborted"] is None
        assert row["ok"] == 3 and row["faults"] == []
        clients = row["clients"]
        assert sorted(c["client-id"] for c in clients) == ["alice", "bob", "carol"]
        # no plaintext update reached the coordinator: only SecAgg+ messages and metrics
        assert all("update-bytes" not in c and "update" not in c for c in clients)
        assert all("train-loss" not in c for c in clients)  # under DP, losses stay on device
    # the global adapter moved away from the initial one
    run = parse_run_config(config)
    from fedpeft.peft_methods.registry import initial_adapter_state

    init = initial_adapter_state(run.model, run.adapter, run.seed)
    final = _params(run_dir, 2)
    assert set(final) == set(init)
    assert any(not torch.equal(init[k], final[k]) for k in init), "the global adapter is unchanged"
    assert any(not torch.equal(_params(run_dir, 1)[k], final[k]) for k in init)
    # each device's ledger: 2 events, and the epsilon it reported equals the ledger's
    for name in ("alice", "bob", "carol"):
        snap = _ledger(nodes[name], name)
        assert snap.client_id == name
        assert [e.metadata.round_number for e in snap.entries] == [1, 2]
        assert all(e.status == "committed" for e in snap.entries)
        eps = compute_epsilon(snap.spent_events(), DELTA, "prv", adjacency=snap.adjacency).epsilon
        reported = next(c["dp-epsilon"] for c in rows[2]["clients"] if c["client-id"] == name)
        assert 0 < eps < 8.0
        assert eps == pytest.approx(reported, rel=1e-9)
    # the coordinator holds no ledger of its own
    assert not (run_dir / "ledgers").exists()


def _phase_dropout(link: SuperLink, nodes: dict[str, ClientNode], run_dir: Path) -> None:
    config = _config(run_dir, **{"num-rounds": 3})
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = submit_run(link, config, stream=False, timeout=420)
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 240
    while not any(r["round"] == 1 for r in _rows(run_dir)):
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline, "round 1 did not finish"
        time.sleep(0.2)
    _kill(nodes["carol"])  # round 2 has just been sent: carol dies mid-round
    thread.join(timeout=480)
    assert not thread.is_alive() and "error" not in outcome, outcome
    result = outcome["result"]
    assert isinstance(result, RunResult) and result.ok, result

    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["secagg"]["survivors"] == 4
    killed = rows[2]
    # the round completes through dropout handling: 3 survivors >= threshold (plan for n=4:
    # degree 3, threshold 3), not aborted, global adapter updated
    assert "skipped" not in killed, killed["skipped"]
    assert {k: killed["secagg"][k] for k in ("survivors", "threshold", "degree", "aborted")} == {
        "survivors": 3, "threshold": 3, "degree": 3, "aborted": None}
    assert killed["ok"] == 3
    assert len(killed["faults"]) >= 1
    assert all(f["reason"] for f in killed["faults"])
    assert not torch.equal(torch.cat([v.flatten() for v in _params(run_dir, 1).values()]),
                           torch.cat([v.flatten() for v in _params(run_dir, 2).values()]))
    # the next round proceeds without her
    after = rows[3]
    assert "skipped" not in after
    assert after["secagg"]["survivors"] == 3 and after["secagg"]["aborted"] is None
    assert sorted(c["client-id"] for c in after["clients"]) == ["alice", "bob", "dave"]
    assert all("update-bytes" not in c for r in rows[1:] for c in r["clients"])
    # the survivors' ledgers hold this run's 3 rounds after the 2 of the first run
    for name in ("alice", "bob"):
        rounds = [e.metadata.round_number for e in _ledger(nodes[name], name).entries]
        assert rounds == [1, 2, 1, 2, 3], (name, rounds)
    assert [e.metadata.round_number for e in _ledger(nodes["dave"], "dave").entries] == [1, 2, 3]
    carol = [e.metadata.round_number for e in _ledger(nodes["carol"], "carol").entries]
    # killed after round 1; a reservation for round 2 counts as spent if she got that far
    assert carol in ([1, 2, 1], [1, 2, 1, 2]), carol


def _phase_resume(link: SuperLink, nodes: dict[str, ClientNode], run_dir: Path) -> None:
    ckpt3 = run_dir / "checkpoints" / "round-0003" / "state.safetensors"
    digest = hashlib.sha256(ckpt3.read_bytes()).hexdigest()
    before = _params(run_dir, 3)
    _submit(link, _config(run_dir, **{"num-rounds": 4, "resume": True}))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["start_round"] == 3 and summary["rounds_completed"] == 4
    assert summary["stopped_reason"] == ""
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # continues; no second round 0
    resumed = rows[4]
    assert "skipped" not in resumed
    assert resumed["secagg"]["survivors"] == 3
    assert sorted(c["client-id"] for c in resumed["clients"]) == ["alice", "bob", "dave"]
    # the resumed run started from the round-3 checkpoint, which it left untouched
    assert hashlib.sha256(ckpt3.read_bytes()).hexdigest() == digest
    after = _params(run_dir, 4)
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    meta = json.loads((run_dir / "checkpoints" / "round-0004" / "meta.json").read_text())
    assert meta["round"] == 4
    for name, expected in (("alice", [1, 2, 1, 2, 3, 4]), ("dave", [1, 2, 3, 4])):
        rounds = [e.metadata.round_number for e in _ledger(nodes[name], name).entries]
        assert rounds == expected, (name, rounds)
