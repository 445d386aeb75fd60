"""DP-SGD on the adapter: exactness against plain autograd, noise level, hygiene, errors.

Tolerances: per-example gradients and parameters are compared with
``torch.testing.assert_close(atol=1e-5, rtol=1e-4)``, i.e. |a - b| <= 1e-5 + 1e-4 |b|
(the relative term matters only for the large gradients of the 2-layer causal LM).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from client.trainer import per_example_loss
from fedpeft.config import TrainConfig
from fedpeft.errors import ConfigError, FedPeftError
from privacy.accounting.events import PoissonSampledGaussianEvent
from privacy.dp_sgd import (
    OPACUS_MODULE_ATTRS,
    OPACUS_PARAM_ATTRS,
    DPConfig,
    DPConfigError,
    DPTrainingError,
    UnsupportedLayerError,
    _forward_losses,
    dp_local_train,
    unwrap,
    wrap_for_dp,
)
from tests.dp.conftest import PAIRS, get_model, make_data

TOL = {"atol": 1e-5, "rtol": 1e-4}
SGD1 = TrainConfig(local_steps=1, lr=0.5, optimizer="sgd")


def dp(**kw: object) -> DPConfig:
    base: dict[str, object] = {"enabled": True, "noise_multiplier": 0.0, "max_grad_norm": 1e6,
                               "expected_batch_size": 4}
    base.update(kw)
    return DPConfig(**base)  # type: ignore[arg-type]


def hook_counts(model: nn.Module) -> list[tuple[int, int, int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
             len(m._backward_pre_hooks)) for m in model.modules()]


def assert_clean(model: nn.Module, hooks_before: list[tuple[int, int, int, int]],
                 params_before: list[nn.Parameter]) -> None:
    assert hook_counts(model) == hooks_before
    assert [id(p) for p in model.parameters()] == [id(p) for p in params_before]
    for p in model.parameters():
        for attr in OPACUS_PARAM_ATTRS:
            assert attr not in p.__dict__, attr
        assert p.grad is None
    for m in model.modules():
        for attr in OPACUS_MODULE_ATTRS:
            assert attr not in m.__dict__, (type(m).__name__, attr)


# ---------------------------------------------------------------- per-example gradients

@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
@pytest.mark.parametrize(("model_name", "adapter"), PAIRS)
def test_per_example_gradients_match_batch_of_one(model_name: str, adapter: str,
                                                  mode: str) -> None:
    model = get_model(model_name, adapter)
    data = make_data(model_name, 4)
    params = model.adapter_parameters()
    wrapped = wrap_for_dp(model, dp(grad_sample_mode=mode))
    try:
        losses = _forward_losses(wrapped, data, model.task)
        losses.mean().backward()
        per_example = {n: p.grad_sample.detach().clone()  # type: ignore[attr-defined]
                       for n, p in params.items()}
        for p in model.parameters():
            if not p.requires_grad:
                assert getattr(p, "grad_sample", None) is None
    finally:
        unwrap(wrapped, model)
    for n, p in params.items():
        p.grad = None
    for i in range(len(data)):
        row = data.rows(torch.tensor([i]))
        out = model(row.input_ids, row.attention_mask, token_type_ids=row.token_type_ids)
        per_example_loss(out.logits, row.labels, model.task).sum().backward()
        for n, p in params.items():
            assert p.grad is not None
            torch.testing.assert_close(per_example[n][i], p.grad, **TOL)
            p.grad = None
    # The check is not vacuous: some per-example gradients differ between examples.
    some = next(iter(per_example.values()))
    assert not torch.allclose(some[0], some[1])


# ---------------------------------------------------------------- one DP step = plain step

def _sampled(n: int, q: float, seed: int) -> list[int]:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < q
    return mask.nonzero().reshape(-1).tolist()


@pytest.mark.parametrize(("model_name", "adapter", "mode", "physical"), [
    *[(m, a, "hooks", None) for m, a in PAIRS],
    ("smollm", "lora", "hooks", 2),
    ("minilm", "lora", "ghost", 2),
    ("smollm", "lora", "ghost", None),
])
def test_dp_step_without_noise_or_clipping_equals_plain_step(
        model_name: str, adapter: str, mode: str, physical: int | None) -> None:
    n, expected_batch, seed = 12, 4, 5
    data = make_data(model_name, n)
    rows = _sampled(n, expected_batch / n, seed)
    assert len(rows) >= 2
    # Reference: plain SGD on sum(per-example losses of the Poisson batch) / expected batch.
    model = get_model(model_name, adapter)
    batch = data.rows(torch.tensor(rows))
    out = model(batch.input_ids, batch.attention_mask, token_type_ids=batch.token_type_ids)
    (per_example_loss(out.logits, batch.labels, model.task).sum() / expected_batch).backward()
    with torch.no_grad():
        expected = {k: p - SGD1.lr * p.grad for k, p in model.adapter_parameters().items()
                    if p.grad is not None}
    before = model.adapter_state()
    model = get_model(model_name, adapter)  # restores the initial adapter state, clears nothing
    for p in model.parameters():
        p.grad = None
    result = dp_local_train(model, data, SGD1,
                            dp(grad_sample_mode=mode, physical_batch_size=physical,
                               expected_batch_size=expected_batch),
                            noise_multiplier=0.0, generator=torch.Generator().manual_seed(seed))
    assert result.batch_sizes == [len(rows)]
    after = model.adapter_state()
    for k, v in expected.items():
        torch.testing.assert_close(after[k], v, **TOL)
    assert any(not torch.equal(after[k], before[k]) for k in expected)


def test_clipping_bounds_each_example() -> None:
    """With a tiny clip C and no noise, the update is sum of clipped grads / B: norm <= k C / B."""
    n, eb, c, lr = 12, 4, 1e-3, 1.0
    data = make_data("minilm", n)
    model = get_model("minilm", "lora")
    before = model.adapter_state()
    res = dp_local_train(model, data, TrainConfig(local_steps=1, lr=lr, optimizer="sgd"),
                         dp(max_grad_norm=c, expected_batch_size=eb), noise_multiplier=0.0,
                         generator=torch.Generator().manual_seed(5))
    after = model.adapter_state()
    delta = torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before))
    k = res.batch_sizes[0]
    assert 0 < float(delta) <= lr * k * c / eb * (1 + 1e-4)
    # Gradients here are far above C, so every example is clipped to norm ~C.
    assert float(delta) > 0.5 * lr * c / eb


# ---------------------------------------------------------------- noise level

@pytest.mark.statistical
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_noise_std_is_sigma_c_over_b(mode: str) -> None:
    """Loss independent of the parameters (all labels -100): update = -lr * N(0, (sigma C)^2)/B.

    ~15k LoRA entries per step, 3 steps: the relative standard error of the empirical std is
    about 1/sqrt(2 * 46k) = 0.33 %, so a 3 % tolerance is a ~9-sigma band (fixed seed).
    """
    sigma, c, eb, lr, steps = 1.3, 0.7, 4, 1.0, 3
    data = make_data("smollm", 12)
    data = type(data)(data.input_ids, data.attention_mask,
                      torch.full_like(data.labels, -100), None)
    model = get_model("smollm", "lora")
    diffs = []
    before = model.adapter_state()
    dp_local_train(model, data, TrainConfig(local_steps=steps, lr=lr, optimizer="sgd"),
                   dp(noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=eb,
                      grad_sample_mode=mode),
                   noise_multiplier=sigma, generator=torch.Generator().manual_seed(0),
                   noise_generator=torch.Generator().manual_seed(11))
    after = model.adapter_state()
    diffs = torch.cat([(after[k] - before[k]).reshape(-1) for k in before])
    expected_std = lr * sigma * c / eb * math.sqrt(steps)
    assert abs(float(diffs.std()) / expected_std - 1) < 0.03
    assert abs(float(diffs.mean())) < 0.03 * expected_std


def test_noise_generator_makes_noise_reproducible_and_none_uses_torch_default() -> None:
    data = make_data("minilm", 12)
    cfg = TrainConfig(local_steps=2, lr=0.1, optimizer="sgd")
    d = dp(noise_multiplier=1.0, max_grad_norm=1.0)

    def run(noise_gen: torch.Generator | None) -> dict[str, torch.Tensor]:
        model = get_model("minilm", "prompt")
        dp_local_train(model, data, cfg, d, noise_multiplier=1.0,
                       generator=torch.Generator().manual_seed(1), noise_generator=noise_gen)
        return model.adapter_state()

    a = run(torch.Generator().manual_seed(7))
    b = run(torch.Generator().manual_seed(7))
    c = run(torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        x = run(None)
        torch.manual_seed(123)
        y = run(None)
        z = run(None)
    assert all(torch.equal(x[k], y[k]) for k in x)  # None = torch's default generator
    assert not all(torch.equal(x[k], z[k]) for k in x)


# ---------------------------------------------------------------- Poisson sampling, event

def test_empty_poisson_batch_is_a_pure_noise_step() -> None:
    n = 40
    seed = next(s for s in range(1000) if not _sampled(n, 1 / n, s))
    data = make_data("minilm", n)
    model = get_model("minilm", "lora")
    before = model.adapter_state()
    res = dp_local_train(model, data, SGD1, dp(expected_batch_size=1), noise_multiplier=0.0,
                         generator=torch.Generator().manual_seed(seed))
    assert res.batch_sizes == [0] and res.steps == 1 and res.losses == []
    after = model.adapter_state()
    assert all(torch.equal(after[k], before[k]) for k in before)
    model = get_model("minilm", "lora")
    dp_local_train(model, data, SGD1, dp(expected_batch_size=1, noise_multiplier=1.0),
                   noise_multiplier=1.0, generator=torch.Generator().manual_seed(seed),
                   noise_generator=torch.Generator().manual_seed(0))
    after = model.adapter_state()
    assert all(not torch.equal(after[k], before[k]) for k in before)


def test_event_describes_the_run() -> None:
    data = make_data("minilm", 20)
    model = get_model("minilm", "prompt")
    res = dp_local_train(model, data, TrainConfig(local_steps=3, lr=0.01),
                         dp(expected_batch_size=5, noise_multiplier=0.9, max_grad_norm=0.5),
                         noise_multiplier=0.9, generator=torch.Generator().manual_seed(0),
                         noise_generator=torch.Generator().manual_seed(0))
    assert res.event == PoissonSampledGaussianEvent(sample_rate=0.25, noise_multiplier=0.9,
                                                    steps=3)
    assert res.steps == 3 and res.examples == 20 and res.clip_norm == 0.5
    assert len(res.batch_sizes) == 3 and res.seconds > 0
    assert res.batch_sizes == [len(_sampled_seq(20, 0.25, 0)[i]) for i in range(3)]


def _sampled_seq(n: int, q: float, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, generator=g) < q).nonzero().reshape(-1).tolist() for _ in range(3)]


def test_sample_rate_at_least_one_is_rejected() -> None:
    data = make_data("minilm", 4)
    model = get_model("minilm", "lora")
    with pytest.raises(ConfigError, match="too small"):
        dp_local_train(model, data, SGD1, dp(expected_batch_size=4), noise_multiplier=1.0,
                       generator=torch.Generator())


# ---------------------------------------------------------------- model hygiene

@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost"])
def test_model_left_clean(mode: str) -> None:
    model = get_model("minilm", "lora")
    for p in model.parameters():
        p.grad = None
    hooks, params = hook_counts(model), list(model.parameters())
    dp_local_train(model, make_data("minilm", 12), TrainConfig(local_steps=2, lr=0.01),
                   dp(grad_sample_mode=mode, noise_multiplier=1.0, physical_batch_size=2),
                   noise_multiplier=1.0, generator=torch.Generator().manual_seed(0),
                   noise_generator=torch.Generator().manual_seed(0))
    assert_clean(model, hooks, params)
    assert not model.training
    assert set(model.adapter_state()) == set(model.adapter_parameters())


def test_model_left_clean_after_an_exception() -> None:
    model = get_model("smollm", "prompt")
    for p in model.parameters():
        p.grad = None
    hooks, params = hook_counts(model), list(model.parameters())

    def boom(step: int, total: int, loss: float) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        dp_local_train(model, make_data("smollm", 12), TrainConfig(local_steps=2, lr=0.01),
                       dp(noise_multiplier=1.0), noise_multiplier=1.0,
                       generator=torch.Generator().manual_seed(0),
                       noise_generator=torch.Generator().manual_seed(0), progress=boom)
    assert_clean(model, hooks, params)
    # The same model trains again (no "hooks added twice").
    model.train()
    dp_local_train(model, make_data("smollm", 12), SGD1, dp(), noise_multiplier=0.0,
                   generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- errors

def test_eval_mode_is_rejected() -> None:
    model = get_model("minilm", "lora")
    model.eval()
    with pytest.raises(DPTrainingError, match="model.train"):
        dp_local_train(model, make_data("minilm", 12), SGD1, dp(), noise_multiplier=1.0,
                       generator=torch.Generator())


def test_trainable_layer_in_eval_mode_is_rejected() -> None:
    model = get_model("minilm", "prompt")
    model.prompt.eval()
    with pytest.raises(DPTrainingError, match="'prompt'"):
        dp_local_train(model, make_data("minilm", 12), SGD1, dp(), noise_multiplier=1.0,
                       generator=torch.Generator())


def test_unsupported_trainable_layer_is_named() -> None:
    model = get_model("minilm", "prompt")
    model.prompt.register_buffer("running_mean", torch.zeros(1))
    hooks, params = hook_counts(model), list(model.parameters())
    try:
        with pytest.raises(UnsupportedLayerError, match="'prompt'.*buffers"):
            dp_local_train(model, make_data("minilm", 12), SGD1, dp(), noise_multiplier=1.0,
                           generator=torch.Generator())
    finally:
        del model.prompt.running_mean
    assert_clean(model, hooks, params)


def test_disabled_config_and_bad_sigma_are_rejected() -> None:
    model = get_model("minilm", "lora")
    data = make_data("minilm", 12)
    with pytest.raises(DPConfigError, match="enabled=False"):
        dp_local_train(model, data, SGD1, DPConfig(), noise_multiplier=1.0,
                       generator=torch.Generator())
    with pytest.raises(ConfigError, match="noise_multiplier"):
        dp_local_train(model, data, SGD1, dp(), noise_multiplier=-1.0,
                       generator=torch.Generator())


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"target_epsilon": 0.0, "noise_multiplier": None}, "target_epsilon=0.0"),
    ({"target_epsilon": -1.0, "noise_multiplier": None}, "target_epsilon=-1.0"),
    ({"delta": 0.0}, "delta=0.0"),
    ({"delta": 1.0}, "delta=1.0"),
    ({"delta": -1e-5}, "delta=-1e-05"),
    ({"max_grad_norm": 0.0}, "max_grad_norm=0.0"),
    ({"max_grad_norm": -1.0}, "max_grad_norm=-1.0"),
    ({"max_grad_norm": math.inf}, "max_grad_norm=inf"),
    ({"noise_multiplier": -0.5}, "noise_multiplier=-0.5"),
    ({"noise_multiplier": math.nan}, "noise_multiplier=nan"),
    ({"noise_multiplier": None}, "exactly one"),
    ({"noise_multiplier": 1.0, "target_epsilon": 8.0}, "exactly one"),
    ({"expected_batch_size": 0}, "expected_batch_size=0"),
    ({"physical_batch_size": 0}, "physical_batch_size=0"),
    ({"grad_sample_mode": "magic"}, "grad_sample_mode='magic'"),
    ({"accountant": "gdp"}, "accountant='gdp'"),
    ({"planned_rounds": 0}, "planned_rounds=0"),
    ({"epsilon_max": 0.0}, "epsilon_max=0.0"),
    ({"noise_multiplier": None, "target_epsilon": 9.0, "epsilon_max": 8.0}, "exceeds"),
])
def test_bad_dp_config_values(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(DPConfigError, match=needle.replace("(", r"\(")) as info:
        dp(**kwargs)
    assert isinstance(info.value, (ConfigError, FedPeftError))


def test_dp_config_sample_rate_and_calibration() -> None:
    cfg = DPConfig(enabled=True, target_epsilon=8.0, expected_batch_size=4, planned_rounds=5)
    assert cfg.sample_rate(40) == pytest.approx(0.1)
    for bad in (4, 3):
        with pytest.raises(ConfigError, match="too small"):
            cfg.sample_rate(bad)
    sigma = cfg.resolve_noise_multiplier(40, steps_per_round=4)
    assert 0.3 < sigma < 5.0
    assert DPConfig(enabled=True, noise_multiplier=1.1).resolve_noise_multiplier(40, 4) == 1.1
    assert DPConfig().enabled is False  # a disabled config needs neither knob

