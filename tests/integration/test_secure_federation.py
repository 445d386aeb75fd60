"""Secure aggregation in the round pipeline (real 2-layer SmolLM2, in-process transport)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.coordinator.server import Coordinator
from fedpeft.core.errors import ClientFault
from fedpeft.peft_methods import get_adapted
from fedpeft.runconfig.config import parse_run_config
from fedpeft.simulations.inmemory import InMemoryTransport
from tests.conftest import tiny_flat

pytestmark = pytest.mark.integration


def _flat(tmp: Path, **kw: object) -> dict[str, object]:
    return tiny_flat(**{"run-dir": str(tmp), "num-rounds": 1, "weighting": "uniform",
                        "local-steps": 2, "secagg-dropout": 0.02, **kw})


def _rows(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_secure_mean_equals_plain_mean_and_nothing_leaves_unmasked(tmp_path: Path) -> None:
    plain = parse_run_config(_flat(tmp_path / "plain"))
    Coordinator(plain, InMemoryTransport(plain, 4), tmp_path / "plain").run_federation()
    model = get_adapted(plain.model, plain.adapter, plain.seed)
    after_plain = model.adapter_state()

    secure = parse_run_config(_flat(tmp_path / "secure", secagg=True))
    transport = InMemoryTransport(secure, 4, record=True)
    Coordinator(secure, transport, tmp_path / "secure").run_federation()
    after_secure = model.adapter_state()
    row = _rows(tmp_path / "secure")[1]
    assert row["ok"] == 4 and row["secagg"]["survivors"] == 4  # type: ignore[index]
    assert row["secagg"]["clipped"] == 0  # type: ignore[index]
    worst = max(float((after_plain[k] - after_secure[k]).abs().max()) for k in after_plain)
    assert worst < 1e-6, worst  # quantisation error bound for clip 1.0, 32 bits, n = 4
    from fedpeft.peft_methods.registry import initial_adapter_state

    init = initial_adapter_state(plain.model, plain.adapter, plain.seed)
    assert any(not torch.equal(init[k], after_secure[k]) for k in init), "secure run learned nothing"
    # what the coordinator received: never an update in the clear
    assert transport.received, "transport recorded nothing"
    for kind, _node, reply in transport.received:
        assert "update" not in reply
        assert kind in ("train", "secagg")


def test_clipping_by_secagg_is_counted_and_warned(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    run = parse_run_config(_flat(tmp_path, secagg=True, **{"secagg-clip": 1e-7}))
    with caplog.at_level("WARNING", logger="fedpeft.coordinator.server"):
        Coordinator(run, InMemoryTransport(run, 3), tmp_path).run_federation()
    sec = _rows(tmp_path)[1]["secagg"]
    assert sec["clients_clipped"] == 3 and sec["clipped"] >= 3  # type: ignore[index]
    assert any("exceeded secagg-clip=1e-07" in r.getMessage() for r in caplog.records)


def test_masked_input_looks_nothing_like_the_update(tmp_path: Path) -> None:
    run = parse_run_config(_flat(tmp_path, secagg=True))
    transport = InMemoryTransport(run, 3, record=True)
    Coordinator(run, transport, tmp_path).run_federation()
    # the masked-input replies are the largest secagg messages: uniform 32-bit words
    sizes = sorted(((len(r["message"]), r["message"]) for k, _, r in transport.received
                    if k == "secagg" and isinstance(r.get("message"), bytes)), key=lambda t: t[0])
    blob = sizes[-1][1]
    words = np.frombuffer(blob[-4 * 4096:], dtype="<u4")
    # plaintext LoRA deltas quantised near zero would cluster at 0 or 2^32-1; masked words don't
    assert 0.3 < float(np.mean(words / 2**32)) < 0.7


def test_dropout_after_key_sharing_still_aggregates(tmp_path: Path) -> None:
    run = parse_run_config(_flat(tmp_path, secagg=True, **{"secagg-dropout": 0.1}))
    calls: dict[int, int] = {}

    def fault(node: int, kind: str, rnd: int) -> Exception | None:
        if kind != "secagg":
            return None
        calls[node] = calls.get(node, 0) + 1
        # node 4 answers share-keys, then drops before sending its masked input
        return ClientFault("battery died") if node == 4 and calls[node] >= 2 else None

    Coordinator(run, InMemoryTransport(run, 5, fault=fault), tmp_path).run_federation()
    row = _rows(tmp_path)[1]
    assert row["secagg"]["survivors"] == 4 and not row["secagg"]["aborted"]  # type: ignore[index]
    assert "skipped" not in row
    assert any(f.get("node") == "4" for f in row["faults"])  # type: ignore[union-attr]


def test_too_many_dropouts_abort_the_round_cleanly(tmp_path: Path) -> None:
    run = parse_run_config(_flat(tmp_path, secagg=True, **{"min-clients": 2}))

    def fault(node: int, kind: str, rnd: int) -> Exception | None:
        return ClientFault("offline") if kind == "secagg" and node != 0 else None

    summary = Coordinator(run, InMemoryTransport(run, 3, fault=fault), tmp_path).run_federation()
    row = _rows(tmp_path)[1]
    assert "global adapter unchanged" in row["skipped"]  # type: ignore[operator]
    assert summary.rounds_completed == 1


def test_secagg_client_refuses_a_plain_round(tmp_path: Path) -> None:
    plain = parse_run_config(_flat(tmp_path))
    secure = parse_run_config(_flat(tmp_path, secagg=True))
    transport = InMemoryTransport(plain, 3, record=True)
    from fedpeft.client.runtime import ClientRuntime

    transport.runtimes[1] = ClientRuntime(secure, transport.runtimes[1].identity)
    Coordinator(plain, transport, tmp_path).run_federation()
    row = _rows(tmp_path)[1]
    assert row["ok"] == 2
    assert "refusing to send an update" in row["faults"][0]["reason"]  # type: ignore[index]
    assert all("update" not in r for k, n, r in transport.received if n == 1)


def test_examples_weighting_is_rejected_with_secagg() -> None:
    from fedpeft.core.errors import ConfigError

    with pytest.raises(ConfigError, match="weighting='uniform'"):
        parse_run_config({"secagg": True, "weighting": "examples"})


def test_infeasible_plan_skips_the_round_with_the_reason(tmp_path: Path) -> None:
    run = parse_run_config(_flat(tmp_path, secagg=True, **{"secagg-dropout": 0.2}))
    Coordinator(run, InMemoryTransport(run, 3), tmp_path).run_federation()
    row = _rows(tmp_path)[1]
    assert "InfeasiblePlanError" in row["skipped"] and "use more clients" in row["skipped"]  # type: ignore[operator]


def test_a_replayed_unmask_request_is_refused(tmp_path: Path) -> None:
    """A client answers one unmask request per session: a replay (with the session restored
    to before the unmask) is refused, by the marker beside its ledger."""
    run = parse_run_config(_flat(tmp_path, secagg=True))
    transport = InMemoryTransport(run, 3)
    sent: list[tuple[dict[str, object], dict[str, bytes]]] = []  # node 0: message, state before
    original = transport.exchange

    def recording(kind, messages, timeout):  # type: ignore[no-untyped-def]
        if kind == "secagg" and 0 in messages:
            sent.append((dict(messages[0]), dict(transport.states[0])))
        return original(kind, messages, timeout)

    transport.exchange = recording  # type: ignore[method-assign]
    Coordinator(run, transport, tmp_path).run_federation()
    assert _rows(tmp_path)[1]["secagg"]["survivors"] == 3  # type: ignore[index]
    unmask, state = sent[-1]  # share-keys, masked-input, unmask
    rt = transport.runtimes[0]
    markers = sorted(m.name for m in (rt.ledger_path().parent / "secagg-unmasked").iterdir())
    assert [m.split("-")[1] for m in markers] == ["0", "1", "2"]  # one per client
    reply = rt.handle("secagg", unmask, dict(state))  # type: ignore[arg-type]
    assert reply["status"] == "error"
    assert "already answered an unmask request" in str(reply["reason"])


def test_authenticated_rounds_in_a_simulation(tmp_path: Path) -> None:
    """``secagg-sim-identities``: every virtual client signs its keys with its enrolled node
    key, the coordinator pins the directory's CA, and the round gives the plain result."""
    from fedpeft.core.protocol import SECAGG_ADVERTISE_KEY
    from fedpeft.deploy.certs import init_cert_dir
    from fedpeft.secagg import messages as msg

    init_cert_dir(tmp_path / "certs", nodes=4, names=[f"client-{i}" for i in range(4)])
    run = parse_run_config(_flat(tmp_path / "run", secagg=True,
                                 **{"secagg-sim-identities": str(tmp_path / "certs")}))
    assert run.secagg_ca == tmp_path / "certs" / "ca.crt"
    transport = InMemoryTransport(run, 4, record=True)
    Coordinator(run, transport, tmp_path / "run").run_federation()
    row = _rows(tmp_path / "run")[1]
    assert row["ok"] == 4 and row["secagg"]["survivors"] == 4  # type: ignore[index]
    adverts = [reply[SECAGG_ADVERTISE_KEY] for kind, _node, reply in transport.received
               if SECAGG_ADVERTISE_KEY in reply]
    assert len(adverts) == 4
    for data in adverts:
        head = msg.peek_header(data)
        assert msg.decode_advertise(data, head.session_id, head.client_id).certificate  # signed


def test_an_unplannable_round_fails_before_round_one(tmp_path: Path) -> None:
    """Rounds of six clients at 10 % dropout cannot meet a 1 % abort target with the security
    floor: a typed error naming the knobs before any round, not an abort in every round (with
    clients-per-round = 0 the size can change, so such a round is skipped with the reason,
    test_infeasible_plan_skips_the_round_with_the_reason)."""
    from fedpeft.core.errors import ConfigError

    run = parse_run_config(_flat(tmp_path, secagg=True, **{"secagg-dropout": 0.1,
                                                           "clients-per-round": 6}))
    with pytest.raises(ConfigError, match="cannot plan rounds of 6 clients.*secagg-max-abort"):
        Coordinator(run, InMemoryTransport(run, 6), tmp_path).run_federation()
    assert not (tmp_path / "metrics.jsonl").exists()  # not even round 0 was evaluated
