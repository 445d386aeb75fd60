"""3 clients x 2 rounds on the real SmolLM2 cut to 2 layers, through the whole round pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedpeft.coordinator.server import Coordinator
from fedpeft.core.errors import ClientFault
from fedpeft.peft_methods import get_adapted
from fedpeft.runconfig.config import parse_run_config
from fedpeft.simulations.inmemory import InMemoryTransport
from tests.conftest import tiny_flat

pytestmark = pytest.mark.integration


def _rows(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_federation_learns_and_keeps_base_frozen(method: str, tmp_path: Path) -> None:
    run = parse_run_config(tiny_flat(method=method, **{"run-dir": str(tmp_path)}))
    adapted = get_adapted(run.model, run.adapter, run.seed)
    base_before = {k: v.clone() for k, v in adapted.frozen_module().state_dict().items()
                   if "lora_" not in k and "modules_to_save" not in k}
    from fedpeft.peft_methods.registry import initial_adapter_state

    initial = initial_adapter_state(run.model, run.adapter, run.seed)
    transport = InMemoryTransport(run, 3)
    summary = Coordinator(run, transport, tmp_path).run_federation()
    assert summary.rounds_completed == 2 and not summary.stopped_reason
    final = adapted.adapter_state()
    assert any(not torch.equal(initial[k], final[k]) for k in initial), "adapter did not change"
    base_after = adapted.frozen_module().state_dict()
    for k, v in base_before.items():
        assert torch.equal(v, base_after[k]), f"frozen base weight {k} changed"
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["eval"]["loss"] < rows[0]["eval"]["loss"]  # type: ignore[index]
    for r in rows[1:]:
        assert r["ok"] == 3 and r["faults"] == []
        for c in r["clients"]:  # type: ignore[union-attr]
            assert c["train-loss-last"] < c["train-loss-first"] * 1.5
    # only adapter tensors travelled
    n_adapter_bytes = sum(t.numel() * 4 for t in initial.values())
    assert rows[1]["bytes_up"] < 3 * n_adapter_bytes + 3 * 8192
    # a PEFT checkpoint per round
    assert (tmp_path / "checkpoints" / "round-0002" / "adapter" / "adapter_config.json").is_file()


def test_faulty_client_is_dropped_not_the_run(tmp_path: Path) -> None:
    run = parse_run_config(tiny_flat(**{"run-dir": str(tmp_path), "num-rounds": 1}))

    def fault(node: int, kind: str, rnd: int) -> Exception | None:
        return ClientFault("device ran out of memory") if node == 1 else None

    summary = Coordinator(run, InMemoryTransport(run, 3, fault=fault), tmp_path).run_federation()
    assert summary.rounds_completed == 1
    row = _rows(tmp_path)[1]
    assert row["ok"] == 2
    assert row["faults"] == [{"node": "1", "reason": "ClientFault: device ran out of memory"}]


def test_mismatched_client_payload_is_recorded(tmp_path: Path) -> None:
    run = parse_run_config(tiny_flat(**{"run-dir": str(tmp_path), "num-rounds": 1}))
    transport = InMemoryTransport(run, 3)
    good = transport.runtimes[2]._mask

    def bad_mask(delta, content, state):  # type: ignore[no-untyped-def]
        return good({k + ".evil": v for k, v in delta.items()}, content, state)

    transport.runtimes[2]._mask = bad_mask  # type: ignore[method-assign]
    Coordinator(run, transport, tmp_path).run_federation()
    row = _rows(tmp_path)[1]
    assert row["ok"] == 2
    assert "does not match the global adapter" in row["faults"][0]["reason"]  # type: ignore[index]


def test_client_with_other_adapter_config_is_refused(tmp_path: Path) -> None:
    run = parse_run_config(tiny_flat(**{"run-dir": str(tmp_path), "num-rounds": 1}))
    other = parse_run_config(tiny_flat(**{"lora-r": 2}))
    transport = InMemoryTransport(run, 3)
    from fedpeft.client.runtime import ClientRuntime

    rt = transport.runtimes[0]
    transport.runtimes[0] = ClientRuntime(other, rt.identity)
    Coordinator(run, transport, tmp_path).run_federation()
    row = _rows(tmp_path)[1]
    assert row["ok"] == 2 and "fingerprint" in row["faults"][0]["reason"]  # type: ignore[index]


def test_too_few_clients_stops_cleanly(tmp_path: Path) -> None:
    run = parse_run_config(tiny_flat(**{"run-dir": str(tmp_path), "min-clients": 3}))

    def fault(node: int, kind: str, rnd: int) -> Exception | None:
        return ClientFault("offline") if node == 0 else None

    summary = Coordinator(run, InMemoryTransport(run, 3, fault=fault), tmp_path).run_federation()
    rows = _rows(tmp_path)
    assert "min-clients 3" in rows[1]["skipped"]  # type: ignore[operator]
    assert summary.rounds_completed == 2  # rounds go on; the global adapter stays put


def test_resume_from_latest_checkpoint(tmp_path: Path) -> None:
    flat = tiny_flat(**{"run-dir": str(tmp_path), "num-rounds": 1, "aggregation": "fedadam",
                        "server-lr": 0.01})
    run1 = parse_run_config(flat)
    Coordinator(run1, InMemoryTransport(run1, 3), tmp_path).run_federation()
    after_one = get_adapted(run1.model, run1.adapter, run1.seed).adapter_state()
    run2 = parse_run_config({**flat, "num-rounds": 2})
    transport = InMemoryTransport(run2, 3)
    seen: list[bytes] = []
    original = transport.exchange

    def spy(kind, messages, timeout):  # type: ignore[no-untyped-def]
        seen.extend(m["adapter"] for m in messages.values())
        return original(kind, messages, timeout)

    transport.exchange = spy  # type: ignore[method-assign]
    summary = Coordinator(run2, transport, tmp_path).run_federation()
    assert summary.start_round == 1 and summary.rounds_completed == 2
    from fedpeft.core.wire import decode

    sent = decode(seen[0], get_adapted(run2.model, run2.adapter, run2.seed).spec())
    assert all(torch.equal(sent[k], after_one[k]) for k in after_one)
    assert [r["round"] for r in _rows(tmp_path)] == [0, 1, 2]


def test_base_model_is_built_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedpeft.peft_methods.registry as registry

    run = parse_run_config(tiny_flat(**{"run-dir": str(tmp_path), "lora-r": 3}))
    built: list[object] = []
    real = registry.build

    def counting_build(*a, **kw):  # type: ignore[no-untyped-def]
        built.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(registry, "build", counting_build)
    Coordinator(run, InMemoryTransport(run, 3), tmp_path).run_federation()
    assert len(built) == 1  # 3 clients x 2 rounds + the coordinator share one model
