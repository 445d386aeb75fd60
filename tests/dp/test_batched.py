"""Batched multi-client training equals training the clients one after another.

Reference implementation: the one-by-one trainers (``local_train``; ``dp_local_train``, itself
Opacus). Every (model, method) pair, plain and record-level DP-SGD, with clients of different
sizes (so different Poisson rates), logical batches cut across passes, and a client whose
training fails. Dropout is off in these models (tests/dp/conftest.py): with dropout on, the
batched path draws its masks in another order (same distribution, other draws).
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import nn

from fedpeft.core.errors import ClientFault, DataError
from fedpeft.privacy.dp_config import DPConfig
from fedpeft.privacy.dp_sgd import dp_local_train
from fedpeft.privacy.dp_sgd_batched import batched_dp_local_train
from fedpeft.training.batched import (
    BatchingError,
    CohortRow,
    batched_local_train,
    cohort_chunks,
    concat_encoded,
    routed,
    segments_of,
)
from fedpeft.training.config import TrainConfig
from fedpeft.training.trainer import local_train

from .conftest import get_model, make_data, seeded

COMBOS = [*[(m, a) for m in ("minilm", "smollm") for a in ("lora", "ffa-lora", "prompt")],
          ("minilm", "bottleneck"), ("smollm", "bottleneck-par"), ("smollm", "prefix")]
SIZES = (5, 9, 7)  # different sizes: different batches, Poisson rates, padding


def _max_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _alone_plain(model_name: str, adapter: str, cfg: TrainConfig) -> list[dict[str, torch.Tensor]]:
    model = get_model(model_name, adapter)
    start = model.adapter_state()
    out = []
    for c, n in enumerate(SIZES):
        model.load_adapter_state(start)
        local_train(model, make_data(model_name, n, seed=c), cfg,
                    generator=torch.Generator().manual_seed(c))
        out.append(model.adapter_state())
    model.load_adapter_state(start)
    return out


@pytest.mark.parametrize(("model_name", "adapter"), COMBOS)
def test_plain_batched_equals_one_by_one(model_name: str, adapter: str) -> None:
    cfg = TrainConfig(local_steps=3, batch_size=4, lr=0.02, optimizer="sgd", momentum=0.9)
    alone = _alone_plain(model_name, adapter, cfg)
    model = get_model(model_name, adapter)
    start = model.adapter_state()
    out = batched_local_train(model, [make_data(model_name, n, seed=c)
                                      for c, n in enumerate(SIZES)], [start] * 3, cfg,
                              generators=[torch.Generator().manual_seed(c) for c in range(3)],
                              micro_batch=5)  # up to 12 rows a step, over several passes
    assert out.errors == [None, None, None] and out.passes > cfg.local_steps  # batches cut
    for c in range(3):
        state = out.states[c]
        assert state is not None
        assert _max_diff(state, start) > 1e-4  # it trained
        assert _max_diff(state, alone[c]) < 1e-5
        assert out.results[c] is not None and out.results[c].steps == 3  # type: ignore[union-attr]
    assert _max_diff(model.adapter_state(), start) == 0.0  # the shared model is untouched
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_adamw_batched_matches_one_by_one_within_its_rounding() -> None:
    """AdamW normalises each coordinate by its own gradient scale, so a coordinate whose
    gradient is ~1e-8 (near Adam's eps) turns summation-order rounding into a visible step:
    the bound is a fraction of one step (lr), not 1e-5 absolute."""
    cfg = TrainConfig(local_steps=3, batch_size=4, lr=1e-3)
    alone = _alone_plain("minilm", "lora", cfg)
    model = get_model("minilm", "lora")
    start = model.adapter_state()
    out = batched_local_train(model, [make_data("minilm", n, seed=c)
                                      for c, n in enumerate(SIZES)], [start] * 3, cfg,
                              generators=[torch.Generator().manual_seed(c) for c in range(3)])
    for c in range(3):
        assert _max_diff(out.states[c], alone[c]) < 0.05 * cfg.lr  # type: ignore[arg-type]


@pytest.mark.parametrize(("model_name", "adapter"), COMBOS)
def test_dp_sgd_batched_equals_one_by_one(model_name: str, adapter: str) -> None:
    cfg = TrainConfig(local_steps=3, batch_size=4, lr=0.05, optimizer="sgd")
    dp = DPConfig(enabled=True, noise_multiplier=0.7, max_grad_norm=0.5,
                  expected_batch_size=4, physical_batch_size=3)
    model = get_model(model_name, adapter)
    start = model.adapter_state()
    datas = [make_data(model_name, n, seed=c) for c, n in enumerate(SIZES)]
    alone, alone_batches = [], []
    for c, data in enumerate(datas):
        model.load_adapter_state(start)
        model.train()
        res = dp_local_train(model, data, cfg, dp, noise_multiplier=0.7,
                             randomness=seeded(100 + c))
        alone.append(model.adapter_state())
        alone_batches.append(res.batch_sizes)
    model.load_adapter_state(start)
    model.train()
    out = batched_dp_local_train(model, datas, [start] * 3, cfg, dp,
                                 noise_multipliers=[0.7] * 3,
                                 randomnesses=[seeded(100 + c) for c in range(3)],
                                 micro_batch=5)
    assert out.errors == [None, None, None]
    for c in range(3):
        result, state = out.results[c], out.states[c]
        assert result is not None and state is not None
        assert result.batch_sizes == alone_batches[c]  # type: ignore[attr-defined]
        assert result.event.sample_rate == dp.sample_rate(SIZES[c])  # type: ignore[attr-defined]
        assert _max_diff(state, alone[c]) < 1e-5
    assert _max_diff(model.adapter_state(), start) == 0.0
    for p in model.parameters():
        assert not hasattr(p, "grad_sample")


def test_dp_noise_is_each_clients_own() -> None:
    """The same data and start with other keys give other results: the noise is per client."""
    cfg = TrainConfig(local_steps=1, batch_size=4, lr=0.1, optimizer="sgd")
    dp = DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=0.5, expected_batch_size=4)
    model = get_model("minilm", "prompt")
    start = model.adapter_state()
    data = make_data("minilm", 6, seed=0)
    out = batched_dp_local_train(model, [data, data], [start] * 2, cfg, dp,
                                 noise_multipliers=[1.0, 1.0],
                                 randomnesses=[seeded(1), seeded(2)])
    assert _max_diff(out.states[0], out.states[1]) > 1e-3  # type: ignore[arg-type]


def test_a_failing_client_is_stopped_and_the_others_are_unaffected() -> None:
    cfg = TrainConfig(local_steps=3, batch_size=4, lr=0.1, optimizer="sgd")
    alone = _alone_plain("smollm", "prompt", cfg)
    model = get_model("smollm", "prompt")
    start = model.adapter_state()
    broken = {k: torch.full_like(v, float("nan")) for k, v in start.items()}
    out = batched_local_train(model, [make_data("smollm", n, seed=c)
                                      for c, n in enumerate(SIZES)], [start, broken, start],
                              cfg, generators=[torch.Generator().manual_seed(c)
                                               for c in range(3)])
    assert isinstance(out.errors[1], ClientFault) and "nan" in str(out.errors[1])
    assert out.states[1] is None and out.results[1] is None
    for c in (0, 2):
        assert _max_diff(out.states[c], alone[c]) < 1e-5  # type: ignore[arg-type]


def test_clients_of_another_adapter_shape_are_refused_by_name() -> None:
    model = get_model("minilm", "lora")
    start = model.adapter_state()
    name = next(iter(start))
    other = dict(start)
    other[name] = torch.zeros(3, 3)
    cfg = TrainConfig(local_steps=1)
    data = make_data("minilm", 4)
    with pytest.raises(BatchingError, match=r"client 1's .* one adapter config"):
        batched_local_train(model, [data, data], [start, other], cfg,
                            generators=[torch.Generator(), torch.Generator()])
    missing = {k: v for k, v in start.items() if k != name}
    with pytest.raises(BatchingError, match="client 1's adapter has tensors"):
        batched_local_train(model, [data, data], [start, missing], cfg,
                            generators=[torch.Generator(), torch.Generator()])
    with pytest.raises(DataError, match="zero examples"):
        batched_local_train(model, [data, make_data("minilm", 0)], [start, start], cfg,
                            generators=[torch.Generator(), torch.Generator()])


def test_a_trainable_tensor_in_an_unroutable_layer_is_refused() -> None:
    model = get_model("minilm", "prompt")
    norm = next(m for m in model.modules() if isinstance(m, nn.LayerNorm))
    norm.weight.requires_grad_(True)
    try:
        with pytest.raises(BatchingError, match="LayerNorm.*batch-clients = 1"), routed(model):
            pass
    finally:
        norm.weight.requires_grad_(False)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_routing_is_undone_after_an_exception() -> None:
    model = get_model("minilm", "lora")
    with pytest.raises(RuntimeError, match="boom"), routed(model):
        assert any("forward" in m.__dict__ for m in model.modules())
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_chunks_group_rows_by_client_and_cover_every_row_once() -> None:
    rows = [CohortRow(row=r, client=r % 3, weight=1.0) for r in range(11)]
    lengths = [(7 * r) % 5 for r in range(11)]
    chunks = cohort_chunks(rows, lengths, 4)
    assert sorted(r.row for c in chunks for r in c) == list(range(11))
    assert max(len(c) for c in chunks) <= 4
    for chunk in chunks:
        segs = segments_of(chunk)
        assert len({s.client for s in segs}) == len(segs)  # one segment per client
        assert segs[0].start == 0 and segs[-1].end == len(chunk)
    with pytest.raises(BatchingError, match="not grouped"):
        segments_of([CohortRow(0, 0, 1.0), CohortRow(1, 1, 1.0), CohortRow(2, 0, 1.0)])


def test_concat_pads_to_the_widest_and_keeps_offsets() -> None:
    a, b = make_data("smollm", 3, seed=0), make_data("smollm", 2, seed=1)
    b = type(b)(b.input_ids[:, :10], b.attention_mask[:, :10], b.labels[:, :10], None)
    both, offsets = concat_encoded([a, b])
    assert offsets == [0, 3] and both.input_ids.shape == (5, a.input_ids.shape[1])
    assert torch.equal(both.input_ids[3:, :10], b.input_ids)
    assert bool((both.labels[3:, 10:] == -100).all())
    assert bool((both.attention_mask[3:, 10:] == 0).all())
