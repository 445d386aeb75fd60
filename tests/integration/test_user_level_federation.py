"""User-level DP end to end: distributed discrete Gaussian noise inside real SecAgg+, the
coordinator's release ledger, survivor-aware accounting, budgets, aborts and crashes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedpeft.cli.main import print_privacy_report, summary_table
from fedpeft.client.runtime import DP_REPLY_FIELDS
from fedpeft.coordinator.server import Coordinator
from fedpeft.coordinator.user_level import USER_LEDGER, RoundAborted, UserLevel
from fedpeft.core.errors import ConfigError
from fedpeft.core.protocol import KIND_SECAGG
from fedpeft.core.vector import vector_length
from fedpeft.privacy.accounting.ddg import epsilon as ddg_epsilon
from fedpeft.privacy.accounting.ledger import read_ledger, user_events
from fedpeft.runconfig.config import parse_run_config, user_round_plan
from fedpeft.simulations.inmemory import InMemoryTransport
from tests.conftest import tiny_flat

pytestmark = pytest.mark.integration

DELTA = 1e-5


def _flat(tmp: Path, **kw: object) -> dict[str, object]:
    return tiny_flat(**{"run-dir": str(tmp), "num-rounds": 2, "dp": True, "dp-level": "user",
                        "secagg": True, "weighting": "uniform", "dp-user-epsilon": 8.0,
                        "dp-user-clip": 0.5, "secagg-dropout": 0.2, "secagg-max-abort": 0.5,
                        "batch-size": 4, "local-steps": 2, "max-examples-per-client": 12,
                        "min-clients": 3, **kw})


def _rows(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_user_level_rounds_release_only_noisy_sums_and_account_per_user(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = parse_run_config(_flat(tmp_path))
    assert run.dp_level == "user" and not run.dp.enabled
    transport = InMemoryTransport(run, 6, record=True)
    summary = Coordinator(run, transport, tmp_path).run_federation()
    assert summary.rounds_completed == 2 and not summary.stopped_reason
    rows = _rows(tmp_path)[1:]
    assert all("skipped" not in r for r in rows), rows
    # nothing computed on private data without noise leaves a device
    for kind, _node, reply in transport.received:
        assert "train-loss" not in reply and "update" not in reply
        if kind != KIND_SECAGG and "secagg" in reply:
            assert reply["dp-level"] == "user"
            # nothing derived from the device's dataset size (user data at user level)
            assert set(reply) <= DP_REPLY_FIELDS["secagg-user"]
            assert not {"num-examples", "dp-q", "dp-sigma"} & set(reply)
    snap = read_ledger(tmp_path / USER_LEDGER)
    assert snap.level == "user" and len(snap.releases) == 2 and not snap.aborts
    plan = user_round_plan(run, 6, vector_length(transport.runtimes[0].model.spec()))
    for release in snap.releases:
        assert release.status == "committed" and len(release.metadata.users) == 6
        # the noise actually present: the other survivors' shares
        assert release.event.contributors == 5 >= plan.min_contributors
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["levels"] == "user" and report["user"]["level"] == "user"
    users = report["user"]["users"]
    assert set(users) == {f"client-{i}" for i in range(6)}
    for user, eps in users.items():
        direct = ddg_epsilon(user_events(snap.releases, user), DELTA).epsilon
        assert eps == pytest.approx(direct, rel=1e-12) and eps <= 8.0
    # the global adapter moved (the noisy mean is applied)
    assert rows[-1]["eval"]["loss"] != _rows(tmp_path)[0]["eval"]["loss"]
    # the printed report names the level, and the summary the metric before and after
    print_privacy_report(tmp_path)
    out = capsys.readouterr().out
    assert "privacy report, user level" in out and "level: user (against the coordinator" in out
    assert "record level" not in out and "client-5" in out
    assert "DP level: user" in summary_table(tmp_path)


def test_dropout_is_accounted_with_the_noise_actually_present(tmp_path: Path) -> None:
    run = parse_run_config(_flat(tmp_path, **{"num-rounds": 1}))

    def drop_node_2_before_masked_input(node: int, kind: str, rnd: int) -> Exception | None:
        if node == 2 and kind == KIND_SECAGG and transport.stage_calls[node] == 2:
            return ConnectionError("device went offline")
        return None

    transport = InMemoryTransport(run, 6, fault=drop_node_2_before_masked_input)
    transport.stage_calls = {i: 0 for i in range(6)}  # type: ignore[attr-defined]
    original = transport.exchange

    def counting(kind, messages, timeout):  # type: ignore[no-untyped-def]
        if kind == KIND_SECAGG:
            for n in messages:
                transport.stage_calls[n] += 1  # type: ignore[attr-defined]
        return original(kind, messages, timeout)

    transport.exchange = counting  # type: ignore[method-assign]
    summary = Coordinator(run, transport, tmp_path).run_federation()
    assert summary.rounds_completed == 1
    snap = read_ledger(tmp_path / USER_LEDGER)
    (release,) = snap.releases
    assert "client-2" not in release.metadata.users and len(release.metadata.users) == 5
    assert release.event.contributors == 4  # survivors - 1, never the 5 planned


def test_gate_aborts_and_records_when_too_few_shares_would_be_present(tmp_path: Path) -> None:
    run = parse_run_config(_flat(tmp_path))
    spec = InMemoryTransport(run, 6).runtimes[0].model.spec()
    user = UserLevel(run, tmp_path, 6, spec)
    rows = [{"node": n, "client-id": f"client-{n}"} for n in range(6)]
    too_few = tuple(range(user.plan.min_contributors))  # one short of the planned shares
    with pytest.raises(RoundAborted, match="nothing was released"):
        user.field_round(1, b"s" * 24).gate(too_few, rows)
    snap = read_ledger(tmp_path / USER_LEDGER)
    assert not snap.releases and len(snap.aborts) == 1
    assert "noise shares" in snap.aborts[0].reason


def test_crash_between_reserve_and_commit_counts_once_as_spent(tmp_path: Path) -> None:
    run = parse_run_config(_flat(tmp_path, **{"num-rounds": 1}))
    spec = InMemoryTransport(run, 6).runtimes[0].model.spec()
    user = UserLevel(run, tmp_path, 6, spec)
    rows = [{"node": n, "client-id": f"client-{n}"} for n in range(6)]
    user.field_round(1, b"s" * 24).gate(tuple(range(6)), rows)  # reserved; then the crash
    again = UserLevel(run, tmp_path, 6, spec)  # the coordinator restarts
    snap = read_ledger(tmp_path / USER_LEDGER)
    (release,) = snap.releases
    assert release.status == "pending"  # counted as spent
    assert again.joined["client-0"] == 1
    assert again.user_ids[3] == "client-3"  # it still knows who is who
    eps = again.report()["users"]["client-0"]
    assert eps == pytest.approx(ddg_epsilon([release.event], DELTA).epsilon)


def test_participation_cap_stops_selecting_users_and_the_run_stops_cleanly(
        tmp_path: Path) -> None:
    run = parse_run_config(_flat(tmp_path, **{"num-rounds": 3, "dp-user-participations": 1}))
    summary = Coordinator(run, InMemoryTransport(run, 6), tmp_path).run_federation()
    assert summary.rounds_completed == 1
    assert "dp-user-participations=1" in summary.stopped_reason
    assert "plan needs rounds of 6" in summary.stopped_reason


def test_client_refuses_a_round_too_small_for_the_planned_noise(tmp_path: Path) -> None:
    """The coordinator plans for 6 clients; a client whose own plan is for 12 (its run config
    says so) refuses the 6-client round: it would carry too few noise shares."""
    run = parse_run_config(_flat(tmp_path, **{"num-rounds": 1}))
    transport = InMemoryTransport(run, 6)
    for rt in transport.runtimes.values():  # each device believes in a federation of 12
        rt.identity = type(rt.identity)(client_id=rt.identity.client_id,
                                        partition_id=rt.identity.partition_id,
                                        num_partitions=12)
    summary = Coordinator(run, transport, tmp_path).run_federation()
    rows = _rows(tmp_path)[1:]
    assert "skipped" in rows[0]
    reasons = " ".join(str(f.get("reason", "")) for f in rows[0]["faults"])  # type: ignore[union-attr]
    assert "too few clients to carry the planned noise" in reasons
    assert summary.rounds_completed == 1


def test_bad_user_level_settings_fail_before_any_round(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="secagg=true"):
        parse_run_config(_flat(tmp_path, secagg=False))
    with pytest.raises(ConfigError, match="dp-level"):
        parse_run_config(_flat(tmp_path, **{"dp-level": "users"}))
    with pytest.raises(ConfigError, match="dp=false"):
        parse_run_config(_flat(tmp_path, dp=False))
    run = parse_run_config(_flat(tmp_path, **{"secagg-bits": 8}))
    with pytest.raises(ConfigError, match="secagg-bits=8"):
        Coordinator(run, InMemoryTransport(run, 6), tmp_path).run_federation()
    assert not (tmp_path / USER_LEDGER).exists()


def test_noisy_sum_variance_matches_the_plan() -> None:
    """Through the real client encoding and SecAgg+: the decoded sum of zero updates is pure
    noise whose per-coordinate variance is the plan's (6 clients), within a 1e-6 false alarm."""
    from fedpeft.privacy.user_level import decode_sum, encode_update
    from fedpeft.secagg.config import SecAggConfig
    from fedpeft.secagg.driver import run_in_memory

    run = parse_run_config(_flat(Path("unused"), **{"secagg-bits": 32}))
    plan = user_round_plan(run, 6, 4096)
    cfg = SecAggConfig(clip=1.0, bits=32, expected_dropout=0.2, max_abort_prob=0.5).resolve(6)
    session = b"variance-test-session-00"
    words = {c: encode_update(np.zeros(4096), plan, session) for c in range(1, 7)}
    got = decode_sum(run_in_memory(cfg, words, session_id=session, field_inputs=True)
                     .result.modular_sum, plan, session, survivors=6)
    expected = 6 * float(plan.ddg.local_variance) * plan.ddg.granularity ** 2
    # sample variance of 4096 ~normal values: relative sd sqrt(2/4096) = 0.022; 5 sd ~ 1e-6
    assert abs(float(np.var(got)) / expected - 1) < 5 * np.sqrt(2 / 4096)


def test_two_nodes_with_one_client_id_are_refused_and_recorded(tmp_path: Path) -> None:
    run = parse_run_config(_flat(tmp_path))
    spec = InMemoryTransport(run, 6).runtimes[0].model.spec()
    user = UserLevel(run, tmp_path, 6, spec)
    rows = [{"node": n, "client-id": f"client-{min(n, 4)}"} for n in range(6)]  # 4 and 5 clash
    with pytest.raises(RoundAborted, match="more than once"):
        user.field_round(1, b"s" * 24).gate(tuple(range(6)), rows)
    snap = read_ledger(tmp_path / USER_LEDGER)
    assert not snap.releases and "more than once" in snap.aborts[0].reason


def test_device_keeps_its_own_user_ledger_and_refuses_past_its_budget(tmp_path: Path) -> None:
    """A coordinator that selects a device more often than dp-user-participations allows:
    the device's own ledger (worst-case shares) refuses before training."""
    run = parse_run_config(_flat(tmp_path, **{"num-rounds": 3, "dp-user-participations": 1}))
    transport = InMemoryTransport(run, 6)
    coordinator = Coordinator(run, transport, tmp_path)
    coordinator_eligible = UserLevel.eligible
    try:  # the lying coordinator ignores the participation cap
        UserLevel.eligible = lambda self, nodes: nodes  # type: ignore[method-assign]
        coordinator.run_federation()
    finally:
        UserLevel.eligible = coordinator_eligible  # type: ignore[method-assign]
    rows = _rows(tmp_path)[1:]
    assert "skipped" not in rows[0] and "skipped" in rows[1]
    faults = rows[1]["faults"]  # type: ignore[index]
    assert {f["status"] for f in faults} == {"privacy_budget_exhausted"}  # type: ignore[index]
    device = read_ledger(transport.runtimes[0].user_ledger_path())
    assert device.level == "user" and len(device.releases) == 1
    (release,) = device.releases
    assert release.status == "committed" and release.metadata.users == ("client-0",)
    plan = user_round_plan(run, 6, vector_length(transport.runtimes[0].model.spec()))
    assert release.event.contributors == plan.min_contributors  # the worst case accepted


def test_adaptive_clip_follows_the_released_counts_and_resumes_from_the_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """dp-user-clip-quantile > 0: each round's clip is sent to the clients, the next follows
    Andrew et al.'s rule from the release's noisy count, the checkpoint keeps it, and a resumed
    run goes on from it; the accounting is the plan's (the count is inside the mechanism)."""
    import math

    from fedpeft.coordinator.checkpoint import latest_checkpoint
    from fedpeft.privacy.adaptive_clip import next_clip

    knobs = {"num-rounds": 2, "dp-user-clip-quantile": 0.5, "dp-user-clip-lr": 0.5,
             "dp-user-clip": 0.01, "dp-user-participations": 3}
    run = parse_run_config(_flat(tmp_path, **knobs))
    Coordinator(run, InMemoryTransport(run, 6), tmp_path).run_federation()
    resumed = parse_run_config(_flat(tmp_path, **{**knobs, "num-rounds": 3}))
    summary = Coordinator(resumed, InMemoryTransport(resumed, 6), tmp_path).run_federation()
    assert summary.start_round == 2 and summary.rounds_completed == 3
    rows = _rows(tmp_path)[1:]
    assert [r["round"] for r in rows] == [1, 2, 3] and all("skipped" not in r for r in rows)
    clips = [r["dp_user_clip"] for r in rows]
    assert clips[0]["clip"] == 0.01  # round 1: the configured clip
    for prev, cur in zip(clips, clips[1:], strict=False):
        assert cur["clip"] == prev["next_clip"]  # across the restart too
    for c in clips:
        assert c["next_clip"] == pytest.approx(next_clip(
            c["clip"], c["unclipped_fraction"], target_quantile=0.5, lr=0.5), rel=1e-12)
        assert c["count_std"] > 0
    # updates of this model are far above 0.01: the noisy count says "clipped", the clip grows
    assert clips[-1]["next_clip"] > 0.01 * math.exp(0.5 * 0.5 * 2)
    ckpt = latest_checkpoint(tmp_path, run.fingerprint())
    assert ckpt is not None and ckpt.meta["user_clip"] == clips[-1]["next_clip"]
    report = json.loads((tmp_path / "privacy_report.json").read_text())["user"]
    assert report["adaptive_clip"]["next_clip"] == clips[-1]["next_clip"]
    snap = read_ledger(tmp_path / USER_LEDGER)
    plan = user_round_plan(run, 6, vector_length(InMemoryTransport(run, 6).runtimes[0]
                                                 .model.spec()))
    assert plan.count_weight > 0 and plan.ddg.dimension == plan.update_dimension + 1
    for release in snap.releases:  # accounted with the mechanism's clip (update + count)
        assert release.event.clip == pytest.approx(plan.ddg.clip)
    for eps in report["users"].values():
        assert eps <= 8.0
    print_privacy_report(tmp_path)
    assert "adaptive clipping (Andrew et al. 2021): clip 0.01 in round 1" in capsys.readouterr().out


def test_clients_refuse_a_round_clip_the_rule_cannot_reach(tmp_path: Path) -> None:
    """A lying coordinator asks for a clip of 100 in round 1 (it must be dp-user-clip): every
    client refuses before it trains or adds anything; nothing is released."""
    from fedpeft.core.protocol import ROUND_CLIP_KEY

    run = parse_run_config(_flat(tmp_path, **{"num-rounds": 1, "dp-user-clip-quantile": 0.5}))
    honest = UserLevel.round_fields
    try:
        UserLevel.round_fields = lambda self: {ROUND_CLIP_KEY: 100.0}  # type: ignore[method-assign]
        Coordinator(run, InMemoryTransport(run, 6), tmp_path).run_federation()
    finally:
        UserLevel.round_fields = honest  # type: ignore[method-assign]
    (row,) = _rows(tmp_path)[1:]
    assert "skipped" in row
    reasons = " ".join(str(f.get("reason", "")) for f in row["faults"])  # type: ignore[union-attr]
    assert "refused: the coordinator's clip 100" in reasons
    assert not read_ledger(tmp_path / USER_LEDGER).releases


def test_the_noise_counts_the_colluders_secagg_is_planned_against() -> None:
    """One threat model: with rounds of 60 clients and secagg-corrupt-fraction 0.05, SecAgg's
    threshold tolerates 3 colluders, so the noise counts at least 3 whatever
    dp-user-colluders says (a higher value is kept), and each client adds more noise than a
    plan that ignored them."""
    flat = {"clients-per-round": 60, "min-clients": 40, "secagg-dropout": 0.1}
    counted = {}
    for fraction, colluders in ((0.05, 0), (0.05, 5), (0.0, 0)):
        run = parse_run_config(_flat(Path("unused"), **flat,
                                     **{"secagg-corrupt-fraction": fraction,
                                        "dp-user-colluders": colluders}))
        plan = user_round_plan(run, 200, 4096)
        counted[(fraction, colluders)] = plan
        threshold = int(run.secagg.resolve_complete(60).threshold or 0)  # type: ignore[union-attr]
        assert plan.min_contributors == threshold - 1 - plan.config.colluders
    assert counted[(0.05, 0)].config.colluders == 3
    assert counted[(0.05, 5)].config.colluders == 5
    assert counted[(0.0, 0)].config.colluders == 0
    # fewer noise shares counted: each client's share is larger
    assert (counted[(0.05, 0)].ddg.local_variance * counted[(0.05, 0)].ddg.granularity ** 2
            > counted[(0.0, 0)].ddg.local_variance * counted[(0.0, 0)].ddg.granularity ** 2)
