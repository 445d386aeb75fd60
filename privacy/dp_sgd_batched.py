"""Record-level DP-SGD for several clients at once over one shared frozen base.

Each client runs exactly the mechanism of :func:`fedpeft.privacy.dp_sgd.dp_local_train`: its
own Poisson batches from its own CSPRNG sampling stream, per-example clipping to ``C``, one
Gaussian noise draw of std ``sigma * C`` per logical step from its own CSPRNG noise stream,
division by the expected batch size, its own optimiser step. Only the forward/backward passes
are shared: the rows of every client's logical batch go through the frozen base together
(:mod:`fedpeft.training.batched`), each row with its own per-row copy of its client's adapter
tensors, made a leaf, so that the gradient of the summed per-example losses with respect to
row ``i``'s copy is example ``i``'s own gradient (the per-example gradient Opacus'
ExpandedWeights computes, Goodfellow 2015; Rochette et al. 2019).

Clipping, noise, scaling and the step are Opacus' own: each client has a
:class:`fedpeft.privacy.dp_sgd.CSPRNGDPOptimizer` whose parameters are the client's leaves, and
``p.grad_sample`` is set to that client's rows of each chunk. A logical batch whose rows fall
into several chunks is accumulated with ``signal_skip_step`` exactly as the one-by-one path
accumulates physical chunks, so the mechanism, and so the ledger's event, are unchanged.
``grad-sample-mode`` applies to the one-by-one path only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import torch

from fedpeft.core.errors import ClientFault, ConfigError
from fedpeft.data.tokenize import Encoded
from fedpeft.peft_methods.base import AdaptedModel
from fedpeft.privacy.accounting.events import PoissonSampledGaussianEvent, validate_noise_multiplier
from fedpeft.privacy.csprng import DPRandomness
from fedpeft.privacy.dp_config import DPConfig, DPConfigError, DPTrainingError
from fedpeft.privacy.dp_sgd import (
    CSPRNGDPOptimizer,
    DPTrainResult,
    _buffer_versions,
    _check_buffers_unchanged,
    _check_stateful_layers,
    _check_train_mode,
    poisson_batches,
)
from fedpeft.training.batched import (
    COHORT_MICRO_BATCH,
    BatchingError,
    Cohort,
    CohortResult,
    CohortRow,
    cohort_chunks,
    cohort_result,
    forward_rows,
    routed,
)
from fedpeft.training.config import TrainConfig
from fedpeft.training.trainer import TrainResult, make_optimizer


def batched_dp_local_train(
    model: AdaptedModel,
    datas: Sequence[Encoded],
    starts: Sequence[Mapping[str, torch.Tensor]],
    train_cfg: TrainConfig,
    dp_cfg: DPConfig,
    *,
    noise_multipliers: Sequence[float],
    randomnesses: Sequence[DPRandomness],
    micro_batch: int = COHORT_MICRO_BATCH,
) -> CohortResult:
    """DP-SGD for each client of ``datas``, as :func:`fedpeft.privacy.dp_sgd.dp_local_train`
    would run it alone from ``starts[c]`` with ``noise_multipliers[c]`` and ``randomnesses[c]``
    (one fresh ``DPRandomness.from_os()`` per client and round in production).

    The model must be in train mode. A client whose loss becomes non-finite is stopped with a
    :class:`ClientFault` in ``errors`` (its reserved ledger event stays spent); the others go
    on. Raises as ``dp_local_train`` does for a disabled config, a bad sigma, randomness that
    is not a :class:`DPRandomness`, or a stateful layer.
    """
    if not dp_cfg.enabled:
        raise DPConfigError("dp_cfg.enabled=False: use fedpeft.training.batched."
                            "batched_local_train for non-private training")
    k = len(datas)
    if not len(noise_multipliers) == len(randomnesses) == k:
        raise BatchingError(f"{k} clients, {len(noise_multipliers)} noise multipliers and "
                            f"{len(randomnesses)} randomness sources: give one of each per client")
    if micro_batch < 1:
        raise ConfigError(f"micro_batch={micro_batch} must be >= 1")
    for r in randomnesses:
        if not isinstance(r, DPRandomness):
            raise DPTrainingError(f"randomness={type(r).__name__} must be a DPRandomness: pass "
                                  "DPRandomness.from_os() (one per client and round)")
    sigmas = [validate_noise_multiplier(s) for s in noise_multipliers]
    _check_train_mode(model)
    _check_stateful_layers(model)
    cohort = Cohort(model, datas, starts)
    qs = [dp_cfg.sample_rate(n) for n in cohort.sizes]
    steps = train_cfg.local_steps
    clip = float(dp_cfg.max_grad_norm)
    results: list[TrainResult | None] = [
        DPTrainResult(steps=0, examples=n,
                      event=PoissonSampledGaussianEvent(sample_rate=q, noise_multiplier=s,
                                                        steps=steps),
                      clip_norm=clip, expected_batch_size=dp_cfg.expected_batch_size,
                      batch_sizes=[], randomness_kind=r.kind)
        for n, q, s, r in zip(cohort.sizes, qs, sigmas, randomnesses, strict=True)]
    errors: list[Exception | None] = [None] * k
    optimizers = [
        CSPRNGDPOptimizer(make_optimizer(leaves, train_cfg), noise=r.noise, secure_mode=True,
                          noise_multiplier=s, max_grad_norm=clip,
                          expected_batch_size=dp_cfg.expected_batch_size, loss_reduction="mean")
        for leaves, r, s in zip(cohort.leaves, randomnesses, sigmas, strict=True)]
    samplers = [poisson_batches(n, q, steps, r.sampling)
                for n, q, r in zip(cohort.sizes, qs, randomnesses, strict=True)]
    start = time.perf_counter()
    passes = 0
    buffers = _buffer_versions(model)
    try:
        with routed(model) as router:
            for step in range(steps):
                logical = [next(s) for s in samplers]  # every stream advances, as alone
                rows = [CohortRow(cohort.offsets[c] + i, c, 1.0)
                        for c in range(k) if errors[c] is None for i in logical[c]]
                loss_sums = torch.zeros(k, dtype=torch.float64)
                for chunk in cohort_chunks(rows, cohort.lengths, micro_batch) if rows else []:
                    batch = cohort.data.rows(torch.tensor([r.row for r in chunk]))
                    owners = torch.tensor([r.client for r in chunk])
                    losses = forward_rows(model, router, batch, chunk, cohort.leaves,
                                          capture=True)
                    _check_buffers_unchanged(model, buffers)  # before any update
                    loss_sums.index_add_(0, owners, losses.detach().double())
                    losses.sum().backward()  # type: ignore[no-untyped-call]
                    per_example = router.per_example_grads()
                    passes += 1
                    for c in torch.unique(owners).tolist():
                        if errors[c] is not None:
                            continue
                        if not math.isfinite(float(loss_sums[c])):
                            errors[c] = ClientFault(
                                f"training loss became {float(loss_sums[c])} at step {step}; "
                                f"lower lr (now {train_cfg.lr})")
                            continue
                        sel = (owners == c).nonzero().squeeze(1)
                        for name, p in cohort.leaves[c].items():
                            p.grad_sample = per_example[name][sel]
                        optimizers[c].signal_skip_step(do_skip=True)  # clip and accumulate
                        optimizers[c].step()
                        optimizers[c].zero_grad(set_to_none=True)
                for c in range(k):
                    if errors[c] is not None:
                        results[c] = None
                        continue
                    # the logical step's end: nothing more to clip; noise once, scale, step
                    for p in cohort.leaves[c].values():
                        p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]
                    optimizers[c].signal_skip_step(do_skip=False)
                    optimizers[c].step()
                    optimizers[c].zero_grad(set_to_none=True)
                    result = results[c]
                    if not isinstance(result, DPTrainResult):  # a failed client left above
                        raise BatchingError(f"client {c} of the cohort has no result to step "
                                            "(an internal error: report it)")
                    result.steps += 1
                    result.batch_sizes.append(len(logical[c]))
                    if logical[c]:
                        result.losses.append(float(loss_sums[c]) / len(logical[c]))
    finally:
        for leaves in cohort.leaves:
            for p in leaves.values():
                for attr in ("grad_sample", "summed_grad"):
                    p.__dict__.pop(attr, None)
    model.eval()
    return cohort_result(cohort, results, errors, start=start, passes=passes)
