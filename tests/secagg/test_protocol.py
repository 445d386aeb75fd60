"""End-to-end correctness of the SecAgg+ round (in-memory driver)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from fedpeft.secagg import SecAggConfig, Stage, run_in_memory
from fedpeft.secagg.client import SecAggClient
from fedpeft.secagg.errors import AbortError, SecAggConfigError
from fedpeft.secagg.quantize import decode_signed, quantize
from fedpeft.secagg.server import SecAggServer

SID = b"test-session-0001"


def _updates(n: int, length: int, seed: int = 0, scale: float = 1e-3) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {1000 + 17 * i: (rng.standard_normal(length) * scale).astype(np.float32) for i in range(n)}


def _seeds(ids: list[int]) -> dict[int, bytes]:
    return {c: (c % 251).to_bytes(1, "big") * 32 for c in ids}


def _expected_int_sum(updates: dict[int, np.ndarray], survivors: tuple[int, ...], plan, seeds) -> np.ndarray:  # type: ignore[no-untyped-def]
    return sum(decode_signed(quantize(updates[c], plan, seeds[c]), plan.bits) for c in survivors)  # type: ignore[return-value]


def test_exact_integer_sum_and_float_mean_within_bound() -> None:
    ups = _updates(5, 2000)
    seeds = _seeds(list(ups))
    cfg = SecAggConfig(clip=1e-2, expected_dropout=0.0)
    run = run_in_memory(cfg, ups, session_id=SID, rounding_seeds=seeds)
    res = run.result
    assert res.survivors == tuple(sorted(ups)) and res.dropped == ()
    assert np.array_equal(res.int_sum, _expected_int_sum(ups, res.survivors, res.plan, seeds))
    plain_mean = np.mean([np.clip(u.astype(np.float64), -1e-2, 1e-2) for u in ups.values()], axis=0)
    err = np.max(np.abs(res.float_mean() - plain_mean))
    assert err <= res.plan.worst_case_mean_error
    assert err < 1e-5 / 100  # 100x below the smallest typical LoRA update value
    assert res.modular_sum.dtype == np.uint32


def test_without_rounding_seed_os_randomness_still_sums_within_bound() -> None:
    ups = _updates(4, 300)
    run = run_in_memory(SecAggConfig(clip=1e-2, expected_dropout=0.0), ups, session_id=SID)
    plain = np.sum([u.astype(np.float64) for u in ups.values()], axis=0)
    assert np.max(np.abs(run.result.float_sum() - plain)) <= 4 * run.result.plan.step


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_dropout_set_after_key_sharing_gives_exact_survivor_sum(data: st.DataObject) -> None:
    """n=6, complete graph, t=4: any <= n - t clients dropping after SHARE_KEYS (masked or unmask)."""
    ups = _updates(6, 64, seed=3)
    ids = sorted(ups)
    seeds = _seeds(ids)
    cfg = SecAggConfig(clip=1e-2, threshold=4, degree=5, max_abort_prob=1.0)
    drop_masked = data.draw(st.lists(st.sampled_from(ids), max_size=2, unique=True))
    rest = [c for c in ids if c not in drop_masked]
    drop_unmask = data.draw(st.lists(st.sampled_from(rest), max_size=2 - len(drop_masked), unique=True))
    run = run_in_memory(cfg, ups, session_id=SID, rounding_seeds=seeds,
                        dropouts={Stage.COLLECT_MASKED: drop_masked, Stage.UNMASK: drop_unmask})
    res = run.result
    assert set(res.survivors) == set(ids) - set(drop_masked)
    assert np.array_equal(res.int_sum, _expected_int_sum(ups, res.survivors, res.plan, seeds))


def test_sparse_graph_n20_with_dropouts_at_every_stage() -> None:
    ups = _updates(20, 256, seed=5)
    ids = sorted(ups)
    seeds = _seeds(ids)
    cfg = SecAggConfig(clip=1e-2, threshold=7, degree=12, max_abort_prob=1.0, corrupt_fraction=0.0)
    run = run_in_memory(cfg, ups, session_id=SID, rounding_seeds=seeds, graph_seed=bytes(32),
                        dropouts={Stage.ADVERTISE_KEYS: [ids[0]], Stage.SHARE_KEYS: [ids[5]],
                                  Stage.COLLECT_MASKED: ids[10:13], Stage.UNMASK: [ids[15]]})
    assert run.server.degree == 12 and all(len(v) == 12 for v in run.server.neighbours.values())
    res = run.result
    assert set(res.survivors) == set(ids) - {ids[0], ids[5], *ids[10:13]}
    assert np.array_equal(res.int_sum, _expected_int_sum(ups, res.survivors, res.plan, seeds))


def test_planned_config_n20_at_20pct_dropout() -> None:
    ups = _updates(20, 128, seed=6)
    ids = sorted(ups)
    seeds = _seeds(ids)
    run = run_in_memory(SecAggConfig(clip=1e-2, expected_dropout=0.2), ups, session_id=SID,
                        rounding_seeds=seeds, dropouts={Stage.COLLECT_MASKED: ids[::5]})
    assert run.server.threshold == 12
    assert np.array_equal(run.result.int_sum,
                          _expected_int_sum(ups, run.result.survivors, run.result.plan, seeds))


def test_fewer_than_t_survivors_aborts_before_any_share_is_revealed() -> None:
    ups = _updates(6, 32)
    ids = sorted(ups)
    cfg = SecAggConfig(clip=1e-2, threshold=4, degree=5, max_abort_prob=1.0)
    server = SecAggServer(cfg, ids, 32, SID)
    clients = {c: SecAggClient(c, SID, cfg) for c in ids}
    for c in ids:
        clients[c].set_update(ups[c])
    req = server.start()
    req = server.on_advertise({c: clients[c].handle(m) for c, m in req.items()})
    req = server.on_shares({c: clients[c].handle(m) for c, m in req.items()})
    masked = {c: clients[c].handle(m) for c, m in req.items()}
    survivors = ids[:3]  # t - 1 survivors
    with pytest.raises(AbortError, match="threshold"):
        server.on_masked({c: masked[c] for c in survivors})
    assert server.stage is Stage.ABORTED and "threshold" in (server.abort_reason or "")
    assert all(clients[c].stage is Stage.COLLECT_MASKED for c in ids)  # nobody was asked for shares


def test_too_few_unmask_responses_abort_without_result() -> None:
    ups = _updates(6, 32)
    cfg = SecAggConfig(clip=1e-2, threshold=4, degree=5, max_abort_prob=1.0)
    with pytest.raises(AbortError):
        run_in_memory(cfg, ups, session_id=SID, dropouts={Stage.UNMASK: sorted(ups)[:3]})


@pytest.mark.statistical
def test_masked_input_is_indistinguishable_from_uniform() -> None:
    """Chi-square on the top 8 bits of 2^16 masked words of an all-zero update.

    256 bins, 255 dof; reject if p < 1e-4 (false-alarm rate 1e-4). The same test on the
    unmasked quantised input must reject (so the test can fail).
    """
    length = 1 << 16
    ups = {c: np.zeros(length, dtype=np.float32) for c in (1, 2, 3)}
    captured: dict[int, bytes] = {}

    def tap(stage: Stage, direction: str, cid: int, data: bytes) -> bytes:
        if stage is Stage.COLLECT_MASKED and direction == "reply":
            captured[cid] = data
        return data

    run = run_in_memory(SecAggConfig(clip=1.0, expected_dropout=0.0), ups, session_id=SID, tamper=tap)
    words = np.frombuffer(captured[2][-4 * length :], dtype="<u4")
    counts = np.bincount(words >> 24, minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4
    plain = quantize(ups[2], run.result.plan, bytes(32))
    assert stats.chisquare(np.bincount(plain >> 24, minlength=256)).pvalue < 1e-4


def test_16_bit_words_exact_and_compact() -> None:
    ups = _updates(4, 100, seed=8, scale=0.2)
    seeds = _seeds(list(ups))
    cfg = SecAggConfig(clip=1.0, bits=16, expected_dropout=0.0)
    run = run_in_memory(cfg, ups, session_id=SID, rounding_seeds=seeds,
                        dropouts={Stage.COLLECT_MASKED: [1000]})
    res = run.result
    assert res.plan.bits == 16 and int(res.modular_sum.max()) < 2**16
    # 2 bytes a coordinate on the wire (plus the header)
    assert all(100 * 2 < run.upload_bytes[c] for c in res.survivors)
    assert np.array_equal(res.int_sum, _expected_int_sum(ups, res.survivors, res.plan, seeds))


def test_upload_is_at_most_1_1x_float32() -> None:
    length = 20_000
    ups = _updates(20, length, seed=9)
    run = run_in_memory(SecAggConfig(clip=1e-2), ups, session_id=SID)
    assert max(run.upload_bytes.values()) <= 1.1 * 4 * length


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"participants": [1, 1, 2, 3]}, "duplicates"),
        ({"participants": [1, 2]}, "n=2"),
        ({"participants": [-1, 2, 3]}, "unsigned 64-bit"),
        ({"vector_length": 0}, "vector_length"),
        ({"session_id": b"short"}, "session_id"),
    ],
)
def test_server_constructor_validation(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    args = {"participants": [1, 2, 3], "vector_length": 4, "session_id": SID, **kwargs}
    with pytest.raises(SecAggConfigError, match=match):
        SecAggServer(SecAggConfig(clip=1.0, expected_dropout=0.0), **args)
