"""DP-SGD on the adapter: exactness against plain autograd, noise level, randomness, hygiene,
stateful layers, errors.

Tolerances: per-example gradients and parameters are compared with
``torch.testing.assert_close(atol=1e-5, rtol=1e-4)``, i.e. |a - b| <= 1e-5 + 1e-4 |b|
(the relative term matters only for the large gradients of the 2-layer causal LM).
Statistical tests use fixed seeds; each states its false-alarm rate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from torch import nn

from fedpeft.core.errors import ConfigError, FedPeftError
from fedpeft.privacy import dp_sgd
from fedpeft.privacy.accounting.events import PoissonSampledGaussianEvent
from fedpeft.privacy.csprng import DPRandomness
from fedpeft.privacy.dp_sgd import (
    OPACUS_MODULE_ATTRS,
    OPACUS_PARAM_ATTRS,
    CSPRNGDPOptimizer,
    CSPRNGDPOptimizerFastGradientClipping,
    DPConfig,
    DPConfigError,
    DPTrainingError,
    UnsupportedLayerError,
    _check_stateful_layers,
    _forward_losses,
    dp_local_train,
    poisson_batches,
    unwrap,
    wrap_for_dp,
)
from fedpeft.training.config import TrainConfig
from fedpeft.training.trainer import per_example_loss
from tests.dp.conftest import (
    METHOD_PAIRS,
    MODELS,
    PAIRS,
    CountsRows,
    OverHidden,
    get_model,
    make_data,
    seeded,
    swapped,
)

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

@pytest.mark.parametrize(("model_name", "adapter", "mode"), [
    *[(m, a, mode) for mode in ("hooks", "functorch", "ew") for m, a in PAIRS],
    *[(m, a, mode) for mode in ("hooks", "functorch") for m, a in METHOD_PAIRS],
    ("minilm", "bitfit", "ew"),
    *[(m, a, "ew") for m in ("minilm", "smollm") for a in ("bottleneck", "bottleneck-par")],
    ("smollm", "prefix", "ew"),
])
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
    for p in params.values():
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
    """The first Poisson batch ``dp_local_train`` draws with ``seeded(seed)``."""
    return next(poisson_batches(n, q, 1, seeded(seed).sampling))


def _seed_with(n: int, q: float, ok: Callable[[list[int]], bool]) -> int:
    return next(s for s in range(1000) if ok(_sampled(n, q, s)))


@pytest.mark.parametrize(("model_name", "adapter", "mode", "physical"), [
    *[(m, a, "hooks", None) for m, a in PAIRS + METHOD_PAIRS],
    ("smollm", "lora", "hooks", 2),
    ("minilm", "ia3", "ghost", 2),
    ("minilm", "bitfit", "ghost", None),
    ("minilm", "bottleneck", "ghost", 2),
    ("smollm", "bottleneck-par", "ghost", None),
    ("smollm", "prefix", "ghost", 2),
    ("minilm", "lora", "ghost", 2),
    ("smollm", "lora", "ghost", None),
])
def test_dp_step_without_noise_or_clipping_equals_plain_step(
        model_name: str, adapter: str, mode: str, physical: int | None) -> None:
    n, expected_batch = 12, 4
    seed = _seed_with(n, expected_batch / n, lambda rows: len(rows) >= 2)
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
                            noise_multiplier=0.0, randomness=seeded(seed))
    assert result.batch_sizes == [len(rows)]
    after = model.adapter_state()
    for k, v in expected.items():
        torch.testing.assert_close(after[k], v, **TOL)
    assert any(not torch.equal(after[k], before[k]) for k in expected)


@pytest.mark.parametrize(("model_name", "adapter"), [
    ("smollm", "prefix"), ("smollm", "prompt"), ("minilm", "bottleneck"), ("minilm", "ia3")])
def test_ghost_clipping_equals_hooks_when_every_example_is_clipped(model_name: str,
                                                                   adapter: str) -> None:
    """Ghost clipping computes per-example norms without the gradients; with a clip far below
    the gradients' norms (every example clipped) and no noise, its step equals the hooks
    engine's, so its norms are the true ones (the embedding rule of privacy/layer_rules.py,
    the (IA)3 rule, Opacus' linear rule)."""
    n, eb = 12, 4
    seed = _seed_with(n, eb / n, lambda rows: len(rows) >= 2)
    data = make_data(model_name, n)
    states = {}
    for mode in ("hooks", "ghost"):
        model = get_model(model_name, adapter)
        before = model.adapter_state()
        dp_local_train(model, data, SGD1, dp(grad_sample_mode=mode, max_grad_norm=1e-3,
                                             expected_batch_size=eb),
                       noise_multiplier=0.0, randomness=seeded(seed))
        states[mode] = model.adapter_state()
        assert any(not torch.equal(states[mode][k], before[k]) for k in before)
    for k, v in states["hooks"].items():
        torch.testing.assert_close(states["ghost"][k], v, atol=1e-7, rtol=1e-4)


def test_clipping_bounds_each_example() -> None:
    """With a tiny clip C and no noise, the update is sum of clipped grads / B: norm <= k C / B."""
    n, eb, c, lr = 12, 4, 1e-3, 1.0
    data = make_data("minilm", n)
    model = get_model("minilm", "lora")
    before = model.adapter_state()
    res = dp_local_train(model, data, TrainConfig(local_steps=1, lr=lr, optimizer="sgd"),
                         dp(max_grad_norm=c, expected_batch_size=eb), noise_multiplier=0.0,
                         randomness=seeded(_seed_with(n, eb / n, bool)))
    after = model.adapter_state()
    delta = torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before))
    k = res.batch_sizes[0]
    assert 0 < float(delta) <= lr * k * c / eb * (1 + 1e-4)
    # Gradients here are far above C, so every example is clipped to norm ~C.
    assert float(delta) > 0.5 * lr * c / eb


# ---------------------------------------------------------------- noise level

#: Two-sided standard-normal quantile for a false-alarm rate of 1e-6 per check.
Z_1E6 = 4.89


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
    before = model.adapter_state()
    dp_local_train(model, data, TrainConfig(local_steps=steps, lr=lr, optimizer="sgd"),
                   dp(noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=eb,
                      grad_sample_mode=mode),
                   noise_multiplier=sigma, randomness=seeded(11))
    after = model.adapter_state()
    diffs = torch.cat([(after[k] - before[k]).reshape(-1) for k in before])
    expected_std = lr * sigma * c / eb * math.sqrt(steps)
    assert abs(float(diffs.std()) / expected_std - 1) < 0.03
    assert abs(float(diffs.mean())) < 0.03 * expected_std


@pytest.mark.statistical
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_pure_noise_step_is_exactly_the_secure_noise_stream(mode: str) -> None:
    """An empty Poisson batch (summed_grad = 0): the update is -lr * noise / B, where ``noise``
    is, parameter by parameter in the optimiser's order, the next secure-mode Gaussian of the
    noise stream with std sigma * C, in the parameter's shape and dtype.

    Statistics of the ~13k entries (fixed seed): |std / (sigma C / B) - 1| < 4.89 / sqrt(2N)
    and |mean| < 4.89 sigma C / (B sqrt(N)), each a false-alarm rate of 1e-6 (normal
    approximation of the sample mean and std of N iid Gaussians).
    """
    n, eb, sigma, c, lr = 40, 1, 1.7, 0.6, 0.5
    seed = _seed_with(n, eb / n, lambda rows: not rows)
    data = make_data("minilm", n)
    model = get_model("minilm", "lora")
    before = model.adapter_state()
    res = dp_local_train(model, data, TrainConfig(local_steps=1, lr=lr, optimizer="sgd"),
                         dp(expected_batch_size=eb, noise_multiplier=sigma, max_grad_norm=c,
                            grad_sample_mode=mode),
                         noise_multiplier=sigma, randomness=seeded(seed))
    assert res.batch_sizes == [0]
    after = model.adapter_state()
    noise = seeded(seed).noise  # a fresh copy of the stream the run used
    for k, p in model.adapter_parameters().items():
        expected = before[k] - lr * (noise.gaussian(p.shape, sigma * c, p.dtype) / eb)
        torch.testing.assert_close(after[k], expected, atol=1e-6, rtol=1e-6)
    diffs = torch.cat([(after[k] - before[k]).reshape(-1) for k in before]).double() / -lr
    big_n, std = diffs.numel(), sigma * c / eb
    assert big_n > 10_000
    assert abs(float(diffs.std()) / std - 1) < Z_1E6 / math.sqrt(2 * big_n)
    assert abs(float(diffs.mean())) < Z_1E6 * std / math.sqrt(big_n)


@pytest.mark.parametrize("ghost", [False, True])
def test_csprng_optimizers_add_noise_like_opacus(ghost: bool) -> None:
    """``p.grad = (p.summed_grad + noise).view_as(p)``, summed_grad marked processed, noise of
    std multiplier * C from the stream in summed_grad's shape and dtype; the ghost optimiser
    uses ``_adjusted_noise_multiplier`` when set (as Opacus does)."""
    p = nn.Parameter(torch.zeros(3, 5))
    cls = CSPRNGDPOptimizerFastGradientClipping if ghost else CSPRNGDPOptimizer
    opt = cls(torch.optim.SGD([p], lr=1.0), noise=seeded(1).noise, noise_multiplier=0.5,
              max_grad_norm=2.0, expected_batch_size=4)
    assert opt.secure_mode is True and opt.generator is None
    multiplier = 0.5
    if ghost:
        opt._adjusted_noise_multiplier = multiplier = 1.5
    summed = torch.full((3, 5), 0.25)
    p.summed_grad = summed  # type: ignore[attr-defined]
    opt.add_noise()
    noise = seeded(1).noise.gaussian((3, 5), multiplier * 2.0, torch.float32)
    assert p.grad is not None and torch.equal(p.grad, summed + noise)
    assert summed._processed is True  # type: ignore[attr-defined]
    del p.summed_grad


# ---------------------------------------------------------------- randomness

def test_seeded_randomness_is_reproducible_and_os_randomness_ignores_torch_seed() -> None:
    data = make_data("minilm", 12)
    cfg = TrainConfig(local_steps=2, lr=0.1, optimizer="sgd")
    d = dp(noise_multiplier=1.0, max_grad_norm=1.0)

    def run(randomness: DPRandomness) -> tuple[dict[str, torch.Tensor], str]:
        model = get_model("minilm", "prompt")
        res = dp_local_train(model, data, cfg, d, noise_multiplier=1.0, randomness=randomness)
        return model.adapter_state(), res.randomness_kind

    (a, kind), (b, _), (c, _) = run(seeded(7)), run(seeded(7)), run(seeded(8))
    assert kind == "seeded"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        x, kind = run(DPRandomness.from_os())
        torch.manual_seed(123)
        state = torch.get_rng_state()
        y, _ = run(DPRandomness.from_os())
        assert torch.equal(torch.get_rng_state(), state)  # the global generator is not used
    assert kind == "os"
    assert not any(torch.equal(x[k], y[k]) for k in x)  # torch's seed does not fix the noise


class PublicSeedSampling:
    """Sampling uniforms the old way: ``torch.rand`` from a generator seeded by public values.

    A leak on purpose (what ``fedpeft.client.runtime`` did before): proves the coordinator test below
    would notice one.
    """

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def uniform(self, n: int) -> npt.NDArray[np.float64]:
        return torch.rand(n, generator=self.gen).double().numpy()


def test_coordinator_cannot_rebuild_the_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator knows the run seed, the partition, the round, n and q, and rebuilds the
    batches as Opacus' sampler drew them from the old per-round generator. With
    ``DPRandomness.from_os()`` that reconstruction is no better than a guess; with sampling
    derived from those public values it is exact (so the test does detect a leak).

    False alarm: each step's reconstruction equals the real batch with probability
    (q^2 + (1-q)^2)^n = 0.625^40 < 1e-8, and the membership agreement over the 4 x 40 trials
    is Binomial(160, 0.625)/160 (sd 0.038): above 0.9 with probability < 1e-12.
    """
    seed, partition, server_round = 42, 3, 2  # public: in the run config and the protocol
    n, eb, steps = 40, 10, 4
    q = eb / n
    public = (seed * 1_000_003 + partition) * 10_007 + server_round

    def rebuild() -> list[list[int]]:
        gen = torch.Generator().manual_seed(public)
        return [(torch.rand(n, generator=gen) < q).nonzero().reshape(-1).tolist()
                for _ in range(steps)]

    used: list[list[int]] = []
    real = dp_sgd.poisson_batches

    def recording(*args: Any, **kwargs: Any) -> Iterator[list[int]]:
        for batch in real(*args, **kwargs):
            used.append(batch)
            yield batch

    monkeypatch.setattr(dp_sgd, "poisson_batches", recording)
    data = make_data("minilm", n)
    cfg = TrainConfig(local_steps=steps, lr=0.01, optimizer="sgd")

    def train(randomness: DPRandomness) -> list[list[int]]:
        used.clear()
        res = dp_local_train(get_model("minilm", "prompt"), data, cfg,
                             dp(expected_batch_size=eb, noise_multiplier=1.0),
                             noise_multiplier=1.0, randomness=randomness)
        assert res.batch_sizes == [len(b) for b in used] and len(used) == steps
        return [list(b) for b in used]

    def agreement(a: list[list[int]], b: list[list[int]]) -> float:
        same = sum((i in sa) == (i in sb) for sa, sb in zip(a, b, strict=True)
                   for i in range(n))
        return same / (n * steps)

    guess = rebuild()
    secure = train(DPRandomness.from_os())
    assert all(s != g for s, g in zip(secure, guess, strict=True))
    assert agreement(secure, guess) < 0.9
    # The same reconstruction catches a leak: sampling derived from the public values.
    leaky = train(DPRandomness(sampling=PublicSeedSampling(public),
                               noise=DPRandomness.from_os().noise, kind="seeded"))
    assert leaky == guess and agreement(leaky, guess) == 1.0
    # from_seed is reproducible by whoever knows the seed: tests only, never in production.
    assert train(seeded(public)) == list(poisson_batches(n, q, steps, seeded(public).sampling))


def test_randomness_must_be_dp_randomness() -> None:
    model = get_model("minilm", "lora")
    with pytest.raises(DPTrainingError, match="DPRandomness.from_os"):
        dp_local_train(model, make_data("minilm", 12), SGD1, dp(), noise_multiplier=1.0,
                       randomness=torch.Generator())  # type: ignore[arg-type]


def test_poisson_batches_read_n_uniforms_per_step() -> None:
    n, q, steps = 30, 0.3, 5
    batches = list(poisson_batches(n, q, steps, seeded(4).sampling))
    u = seeded(4).sampling.uniform(n * steps).reshape(steps, n)
    assert batches == [np.nonzero(row < q)[0].tolist() for row in u]
    assert len(batches) == steps and any(batches) and batches[0] != batches[1]


# ---------------------------------------------------------------- Poisson sampling, event

def test_empty_poisson_batch_is_a_pure_noise_step() -> None:
    n = 40
    seed = _seed_with(n, 1 / n, lambda rows: not rows)
    data = make_data("minilm", n)
    model = get_model("minilm", "lora")
    before = model.adapter_state()
    res = dp_local_train(model, data, SGD1, dp(expected_batch_size=1), noise_multiplier=0.0,
                         randomness=seeded(seed))
    assert res.batch_sizes == [0] and res.steps == 1 and res.losses == []
    after = model.adapter_state()
    assert all(torch.equal(after[k], before[k]) for k in before)
    model = get_model("minilm", "lora")
    dp_local_train(model, data, SGD1, dp(expected_batch_size=1, noise_multiplier=1.0),
                   noise_multiplier=1.0, randomness=seeded(seed))
    after = model.adapter_state()
    assert all(not torch.equal(after[k], before[k]) for k in before)


def test_event_describes_the_run() -> None:
    data = make_data("minilm", 20)
    model = get_model("minilm", "prompt")
    res = dp_local_train(model, data, TrainConfig(local_steps=3, lr=0.01),
                         dp(expected_batch_size=5, noise_multiplier=0.9, max_grad_norm=0.5),
                         noise_multiplier=0.9, randomness=seeded(0))
    assert res.event == PoissonSampledGaussianEvent(sample_rate=0.25, noise_multiplier=0.9,
                                                    steps=3)
    assert res.steps == 3 and res.examples == 20 and res.clip_norm == 0.5
    assert len(res.batch_sizes) == 3 and res.seconds > 0 and res.randomness_kind == "seeded"
    assert res.batch_sizes == [len(b) for b in poisson_batches(20, 0.25, 3, seeded(0).sampling)]


def test_sample_rate_at_least_one_is_rejected() -> None:
    data = make_data("minilm", 4)
    model = get_model("minilm", "lora")
    with pytest.raises(ConfigError, match="too small"):
        dp_local_train(model, data, SGD1, dp(expected_batch_size=4), noise_multiplier=1.0,
                       randomness=seeded(0))


# ---------------------------------------------------------------- model hygiene

@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost"])
def test_model_left_clean(mode: str) -> None:
    model = get_model("minilm", "lora")
    for p in model.parameters():
        p.grad = None
    hooks, params = hook_counts(model), list(model.parameters())
    dp_local_train(model, make_data("minilm", 12), TrainConfig(local_steps=2, lr=0.01),
                   dp(grad_sample_mode=mode, noise_multiplier=1.0, physical_batch_size=2),
                   noise_multiplier=1.0, randomness=seeded(0))
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
                       dp(noise_multiplier=1.0), noise_multiplier=1.0, randomness=seeded(0),
                       progress=boom)
    assert_clean(model, hooks, params)
    # The same model trains again (no "hooks added twice").
    model.train()
    dp_local_train(model, make_data("smollm", 12), SGD1, dp(), noise_multiplier=0.0,
                   randomness=seeded(0))


# ---------------------------------------------------------------- stateful layers

def _hidden_size(model: nn.Module) -> int:
    dense = next(m for n, m in model.named_modules() if n.endswith("layer.0.output.dense"))
    assert isinstance(dense, nn.Linear)
    return dense.out_features


@pytest.mark.parametrize("norm", ["batchnorm", "instancenorm"])
def test_frozen_stateful_norm_in_train_mode_is_rejected_and_fine_in_eval(norm: str) -> None:
    model = get_model("minilm", "lora")
    hidden = _hidden_size(model)
    inner = (nn.BatchNorm1d(hidden) if norm == "batchnorm"
             else nn.InstanceNorm1d(hidden, affine=True, track_running_stats=True))
    layer = OverHidden(inner)
    data = make_data("minilm", 12)
    with swapped(model, "layer.0.output.dropout", layer) as name:
        model.train()
        assert not any(p.requires_grad for p in layer.parameters())  # frozen
        hooks, params = hook_counts(model), list(model.parameters())
        before = model.adapter_state()
        with pytest.raises(UnsupportedLayerError,
                           match=re.escape(f"'{name}.norm'") + r".*train mode.*GroupNorm"):
            dp_local_train(model, data, SGD1, dp(noise_multiplier=1.0), noise_multiplier=1.0,
                           randomness=seeded(0))
        assert_clean(model, hooks, params)
        assert all(torch.equal(v, before[k]) for k, v in model.adapter_state().items())
        # The same layer in eval mode (running statistics, no batch mixing): fine.
        running = inner.running_mean.clone()  # type: ignore[union-attr]
        model.train()
        layer.eval()
        res = dp_local_train(model, data, SGD1, dp(noise_multiplier=1.0),
                             noise_multiplier=1.0, randomness=seeded(0))
        assert res.steps == 1 and sum(res.batch_sizes) > 0
        assert torch.equal(inner.running_mean, running)  # type: ignore[arg-type]


def test_batchnorm_without_running_stats_is_rejected_even_in_eval() -> None:
    model = get_model("minilm", "lora")
    layer = OverHidden(nn.BatchNorm1d(_hidden_size(model), track_running_stats=False))
    with swapped(model, "layer.0.output.dropout", layer) as name:
        model.train()
        layer.eval()
        with pytest.raises(UnsupportedLayerError,
                           match=re.escape(f"'{name}.norm'") + r".*even in eval mode"):
            dp_local_train(model, make_data("minilm", 12), SGD1, dp(), noise_multiplier=0.0,
                           randomness=seeded(0))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_layer_changing_a_buffer_in_train_mode_is_rejected(mode: str) -> None:
    model = get_model("minilm", "lora")
    layer = CountsRows()
    data = make_data("minilm", 12)
    with swapped(model, "layer.0.output.dropout", layer) as name:
        model.train()
        hooks, params = hook_counts(model), list(model.parameters())
        before = model.adapter_state()
        with pytest.raises(UnsupportedLayerError,
                           match=re.escape(f"'{name}'") + r".*buffer 'seen'.*eval mode"):
            dp_local_train(model, data, SGD1, dp(grad_sample_mode=mode, noise_multiplier=1.0),
                           noise_multiplier=1.0, randomness=seeded(0))
        assert int(layer.seen) > 0  # it did run, and the error came before any update:
        assert all(torch.equal(v, before[k]) for k, v in model.adapter_state().items())
        assert_clean(model, hooks, params)
        model.train()
        layer.eval()
        seen = int(layer.seen)
        dp_local_train(model, data, SGD1, dp(grad_sample_mode=mode), noise_multiplier=0.0,
                       randomness=seeded(0))
        assert int(layer.seen) == seen


@pytest.mark.parametrize(("model_name", "adapter"), PAIRS)
def test_real_models_have_no_stateful_layers(model_name: str, adapter: str) -> None:
    """The real models pass the check, and have buffers (position_ids, rotary inv_freq) that
    the buffer check sees and must not flag (every other test trains them with it on)."""
    model = get_model(model_name, adapter)
    _check_stateful_layers(model)
    names = [n for n, _ in model.named_buffers()]
    needle = "inv_freq" if MODELS[model_name].task == "causal_lm" else "position_ids"
    assert any(n.endswith(needle) for n in names), names


# ---------------------------------------------------------------- errors

def test_eval_mode_is_rejected() -> None:
    model = get_model("minilm", "lora")
    model.eval()
    with pytest.raises(DPTrainingError, match="model.train"):
        dp_local_train(model, make_data("minilm", 12), SGD1, dp(), noise_multiplier=1.0,
                       randomness=seeded(0))


def test_trainable_layer_in_eval_mode_is_rejected() -> None:
    model = get_model("minilm", "prompt")
    model.prompt.eval()
    with pytest.raises(DPTrainingError, match="'prompt'"):
        dp_local_train(model, make_data("minilm", 12), SGD1, dp(), noise_multiplier=1.0,
                       randomness=seeded(0))


def test_unsupported_trainable_layer_is_named() -> None:
    model = get_model("minilm", "prompt")
    model.prompt.register_buffer("running_mean", torch.zeros(1))
    hooks, params = hook_counts(model), list(model.parameters())
    try:
        with pytest.raises(UnsupportedLayerError, match="'prompt'.*buffers"):
            dp_local_train(model, make_data("minilm", 12), SGD1, dp(), noise_multiplier=1.0,
                           randomness=seeded(0))
    finally:
        del model.prompt.running_mean
    assert_clean(model, hooks, params)


def test_disabled_config_and_bad_sigma_are_rejected() -> None:
    model = get_model("minilm", "lora")
    data = make_data("minilm", 12)
    with pytest.raises(DPConfigError, match="enabled=False"):
        dp_local_train(model, data, SGD1, DPConfig(), noise_multiplier=1.0,
                       randomness=seeded(0))
    with pytest.raises(ConfigError, match="noise_multiplier"):
        dp_local_train(model, data, SGD1, dp(), noise_multiplier=-1.0, randomness=seeded(0))


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

