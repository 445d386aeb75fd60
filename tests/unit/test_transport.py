"""The coordinator's reply classifier and the faults plain and secure rounds record from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.coordinator.secure_round import SecureRoundResult, _ok_messages
from fedpeft.coordinator.server import Coordinator
from fedpeft.coordinator.transport import Fault, Reply, classify_reply
from fedpeft.core.errors import PayloadError
from fedpeft.core.protocol import STATUS_BUDGET_EXHAUSTED, Content, require_field
from fedpeft.privacy.accounting import BUDGET_EXHAUSTED_STATUS
from fedpeft.runconfig.config import parse_run_config
from tests.conftest import tiny_flat


def test_no_reply_is_a_timeout() -> None:
    fault = classify_reply(3, None)
    assert isinstance(fault, Fault)
    assert list(fault.items()) == [("node", "3"), ("reason", "no reply before the round timeout")]


def test_a_transport_error_is_the_reason() -> None:
    fault = classify_reply(3, Reply(3, error="client error 1: boom"))
    assert list(fault.items()) == [("node", "3"), ("reason", "client error 1: boom")]
    # an error wins over content that came with it
    fault = classify_reply(3, Reply(3, content={"status": "ok"}, error="late"))
    assert fault == {"node": "3", "reason": "late"}


def test_no_content_is_an_empty_reply() -> None:
    assert classify_reply(3, Reply(3)) == {"node": "3", "reason": "empty reply"}


def test_a_status_other_than_ok_names_client_status_and_reason() -> None:
    reply = Reply(3, content={"status": "error", "client-id": "c-3", "reason": "ConfigError: x"})
    fault = classify_reply(3, reply)
    assert isinstance(fault, Fault)
    assert list(fault.items()) == [("node", "3"), ("client", "c-3"), ("status", "error"),
                                   ("reason", "ConfigError: x")]
    exhausted = classify_reply(3, Reply(3, content={"status": STATUS_BUDGET_EXHAUSTED}))
    assert exhausted == {"node": "3", "client": "3", "status": "privacy_budget_exhausted",
                         "reason": "privacy_budget_exhausted"}  # no reason: the status
    assert classify_reply(3, Reply(3, content={"client-id": "c"})) == {
        "node": "3", "client": "c", "status": "None", "reason": "None"}


def test_an_ok_reply_is_its_content() -> None:
    content: Content = {"status": "ok", "client-id": "c-3", "update": b"x"}
    assert classify_reply(3, Reply(3, content=content)) is content
    assert not isinstance(classify_reply(3, Reply(3, content=content)), Fault)


def test_the_stage_follows_the_node() -> None:
    fault = classify_reply(3, Reply(3, content={"status": "error", "client-id": "c"}),
                           stage="unmask")
    assert list(fault) == ["node", "stage", "client", "status", "reason"]
    assert fault["stage"] == "unmask"
    assert list(classify_reply(3, None, stage="train")) == ["node", "stage", "reason"]


def test_a_fault_is_a_plain_record() -> None:
    fault = classify_reply(3, None)
    assert json.loads(json.dumps(fault)) == fault == {"node": "3",
                                                      "reason": "no reply before the round timeout"}


def test_secure_round_faults_carry_the_stage_and_the_missing_bytes() -> None:
    result = SecureRoundResult(mean_delta=None)
    replies = {
        1: Reply(1, content={"status": "ok", "client-id": "c-1", "message": b"abc"}),
        2: Reply(2, error="gone"),
        3: Reply(3, content={"status": "error", "client-id": "c-3", "reason": "r"}),
        4: Reply(4, content={"status": "ok", "client-id": "c-4", "message": "not bytes"}),
    }
    got = _ok_messages([1, 2, 3, 4, 5], replies, "message", "share-keys", result)
    assert got == {1: b"abc"} and result.bytes_up == 3
    assert result.faults == [
        {"node": "2", "stage": "share-keys", "reason": "gone"},
        {"node": "3", "stage": "share-keys", "client": "c-3", "status": "error", "reason": "r"},
        {"node": "4", "stage": "share-keys", "reason": "reply lacks 'message' bytes"},
        {"node": "5", "stage": "share-keys", "reason": "no reply before the round timeout"},
    ]


def test_plain_round_faults(tmp_path: Path) -> None:
    run = parse_run_config(tiny_flat(**{"run-dir": str(tmp_path)}))
    coordinator = Coordinator(run, transport=None, run_dir=tmp_path)  # type: ignore[arg-type]
    replies = {
        1: Reply(1),
        2: Reply(2, content={"status": "privacy_budget_exhausted", "client-id": "c-2",
                             "reason": "spent"}),
        3: Reply(3, content={"status": "ok", "client-id": "c-3", "num-examples": 4}),
    }
    updates, weights, faults, rows = coordinator._collect([1, 2, 3, 4], replies, spec={})
    assert (updates, weights, rows) == ([], [], [])
    assert faults == [
        {"node": "1", "reason": "empty reply"},
        {"node": "2", "client": "c-2", "status": "privacy_budget_exhausted", "reason": "spent"},
        {"node": "3", "client": "c-3", "reason": "reply has no 'update' bytes"},
        {"node": "4", "reason": "no reply before the round timeout"},
    ]


def test_budget_status_is_the_protocol_status() -> None:
    assert BUDGET_EXHAUSTED_STATUS == STATUS_BUDGET_EXHAUSTED == "privacy_budget_exhausted"


def test_require_field() -> None:
    content: Content = {"round": 3, "adapter": b"x"}
    assert require_field(content, "round", int) == 3
    with pytest.raises(PayloadError, match="lacks 'fingerprint'"):
        require_field(content, "fingerprint", str)
    with pytest.raises(PayloadError, match="'adapter' is bytes, expected str"):
        require_field(content, "adapter", str)
