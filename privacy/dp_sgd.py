"""Record-level DP-SGD on the adapter tensors only (Abadi et al., CCS 2016), with Opacus.

:func:`dp_local_train` mirrors :func:`fedpeft.training.trainer.local_train` but each of the
``local_steps`` logical steps is one application of the Poisson-subsampled Gaussian mechanism:

1. Poisson sampling: every local example joins the batch independently with probability
   ``q = expected_batch_size / n``, decided by CSPRNG uniforms (:func:`poisson_batches`, see
   "Randomness"). Batches have a random size and may be empty; an empty batch still yields a
   (pure-noise) step.
2. Per-example gradients of the per-example losses (``fedpeft.training.trainer.per_example_loss``) of
   the trainable adapter parameters only, by an Opacus ``GradSampleModule`` in the configured
   mode; frozen base weights get no per-example gradient.
3. Each per-example gradient is clipped to L2 norm ``C``; the clipped gradients are summed,
   Gaussian noise of std ``sigma * C`` is added, and the sum is divided by the *expected*
   batch size ``B`` (Opacus ``DPOptimizer`` with ``loss_reduction="mean"``, its noise drawn
   from the CSPRNG, see "Randomness"), then the wrapped optimiser
   (``fedpeft.training.trainer.make_optimizer``) steps.

A logical batch larger than ``physical_batch_size`` is split into physical chunks exactly as
Opacus ``BatchMemoryManager`` does (``DPOptimizer.signal_skip_step``): clipped gradients are
accumulated over the chunks and noise is added once per logical step.

Opacus building blocks are used directly (``GradSampleModule`` + ``DPOptimizer``), not
``PrivacyEngine``: no Opacus accountant runs here. Accounting is the ledger's job
(``fedpeft.privacy.accounting``): the returned :class:`DPTrainResult` carries the
``PoissonSampledGaussianEvent`` that describes what was run.

The shared model is left as it was found: hooks, ``grad_sample`` and the other attributes
Opacus attaches are removed in a ``finally`` block, parameters stay the same objects, and the
model is left in eval mode (as ``local_train`` leaves it).

Randomness
----------
Both random choices come from the ``randomness`` argument, a
:class:`fedpeft.privacy.csprng.DPRandomness`: two independent ChaCha20 keystreams (RFC 8439) of one
256-bit key, domain-separated by nonce. Production passes ``DPRandomness.from_os()`` (a fresh
key from the OS CSPRNG per client and round); tests pass ``DPRandomness.from_seed(seed)``
(reproducible by anyone who knows the seed, never in production). The returned result records
``randomness_kind`` (``"os"`` or ``"seeded"``). Neither stream reads a ``torch.Generator`` or
torch's global RNG state, so ``torch.manual_seed`` anywhere in the process affects neither
(the model's own dropout, if on, still draws from torch's generator; it is not part of the
mechanism).

* **Batch sampling** (:func:`poisson_batches`, replacing Opacus'
  ``UniformWithReplacementSampler``): at each logical step, example ``i`` of the ``n`` joins
  the batch iff the ``i``-th of the next ``n`` uniforms of ``randomness.sampling`` (53 random
  bits each) is ``< q``. The coordinator knows the run seed, the partition and the round but
  not the key, so it cannot rebuild the batches and amplification by subsampling holds
  against it. (Non-private training, ``fedpeft.training.trainer.local_train``, still shuffles with the
  seeded per-round ``torch.Generator``; that is utility only.)
* **DP noise** (:class:`CSPRNGDPOptimizer`, :class:`CSPRNGDPOptimizerFastGradientClipping`,
  subclasses of Opacus' optimizers that override only ``add_noise``): for each parameter, in
  the optimiser's order, a tensor of the shape, dtype and device of ``p.summed_grad`` is
  drawn from ``randomness.noise`` with std ``sigma * C`` (``sigma`` is the ghost optimiser's
  ``_adjusted_noise_multiplier`` when set, as in Opacus), then exactly what Opacus does:
  ``p.grad = (p.summed_grad + noise).view_as(p)`` and ``p.summed_grad`` is marked processed.
  The noise has the floating-point mitigation of Opacus' ``secure_mode`` **on**: each value
  is the sum of 4 independent ``N(0, (sigma C)^2)`` draws (float64 Box-Muller) divided by 2
  (Holohan & Braghin 2021, arXiv 2107.10138, sec. 5.1), so the CSPRNG-plus-mitigation
  combination that Opacus' ``secure_mode`` provides with ``torchcsprng`` is provided here
  without it. Residual caveat: the Gaussian is computed in float64 and rounded to the
  parameters' dtype, and each draw's tail is cut at ``8.57`` standard deviations (53-bit
  uniforms); the guarantee is stated for the ideal Gaussian.
* Opacus' own "Secure RNG turned off" warning is issued only by ``PrivacyEngine``, which this
  module does not use; it is not filtered anywhere in fedpeft.

Stateful layers
---------------
Before training, every module of the model, trainable or frozen, is checked: a BatchNorm in
train mode (batch statistics mix the examples of a batch, so one example's clipped gradient
depends on the others and per-example clipping no longer bounds its influence), a BatchNorm
without running statistics (batch statistics even in eval mode) and an InstanceNorm that
tracks running statistics in train mode raise :class:`UnsupportedLayerError`. During
training, any buffer of the model changed by a forward pass (a layer keeping state computed
from the private batch) raises the same error before the step is applied.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus.grad_sample import (  # type: ignore[import-untyped]
    GradSampleModule,
    GradSampleModuleExpandedWeights,
    GradSampleModuleFastGradientClipping,
)
from opacus.grad_sample.gsm_base import AbstractGradSampleModule  # type: ignore[import-untyped]
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping  # type: ignore[import-untyped]
from opacus.optimizers.optimizer import (  # type: ignore[import-untyped]
    _check_processed_flag,
    _mark_as_processed,
)
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping  # type: ignore[import-untyped]
from opacus.utils.module_utils import trainable_modules  # type: ignore[import-untyped]
from opacus.validators import ModuleValidator  # type: ignore[import-untyped]
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from fedpeft.core.errors import ClientFault, DataError
from fedpeft.data.tokenize import Encoded
from fedpeft.peft_methods.base import AdaptedModel
from fedpeft.privacy import layer_rules  # noqa: F401 - registers the custom layers' Opacus rules
from fedpeft.privacy.accounting.events import PoissonSampledGaussianEvent, validate_noise_multiplier
from fedpeft.privacy.auditing.gradient_canaries import CanaryHook
from fedpeft.privacy.csprng import DPRandomness, GaussianSource, UniformSource
from fedpeft.privacy.dp_config import DPConfig, DPConfigError, DPTrainingError, UnsupportedLayerError
from fedpeft.training.config import TrainConfig
from fedpeft.training.trainer import (
    Progress,
    TrainResult,
    length_sorted_chunks,
    make_optimizer,
    per_example_loss,
)

__all__ = [
    "CSPRNGDPOptimizer", "CSPRNGDPOptimizerFastGradientClipping", "DPConfig", "DPConfigError",
    "DPRandomness", "DPTrainResult", "DPTrainingError", "UnsupportedLayerError",
    "dp_local_train", "poisson_batches", "wrap_for_dp", "unwrap", "OPACUS_PARAM_ATTRS",
    "OPACUS_MODULE_ATTRS",
]

#: Attributes Opacus attaches to parameters (removed after training).
OPACUS_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample",
                      "summed_grad")
#: Attributes Opacus attaches to modules (removed after training, also after an exception).
OPACUS_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad",
                       "autograd_grad_sample_hooks")


@dataclass(kw_only=True)
class DPTrainResult(TrainResult):
    """A :class:`TrainResult` plus the mechanism that produced it.

    ``losses`` are the mean per-example losses of each non-empty logical batch. They are
    computed on private data **without** noise: keep them on the client (or report only DP
    or evaluation metrics). ``randomness_kind`` is the :attr:`DPRandomness.kind` the batches
    and the noise came from (``"os"``: unpredictable; ``"seeded"``: reproducible from a seed,
    not private against whoever knows it). ``batch_sizes`` are private too (keep them local).
    """

    event: PoissonSampledGaussianEvent
    clip_norm: float
    expected_batch_size: int
    batch_sizes: list[int]
    randomness_kind: str

    @property
    def sample_rate(self) -> float:
        return self.event.sample_rate

    @property
    def noise_multiplier(self) -> float:
        return self.event.noise_multiplier


def _check_train_mode(model: nn.Module) -> None:
    if not model.training:
        raise DPTrainingError(
            f"model {type(model).__name__} is in eval mode (training=False); Opacus records "
            "per-example activations only in train mode: call model.train() before "
            "dp_local_train")
    for name, module in trainable_modules(model):
        if not module.training:
            raise DPTrainingError(
                f"trainable layer {name!r} ({type(module).__name__}) is in eval mode while the "
                "model is in train mode; Opacus would compute no per-example gradient for it. "
                "Call model.train() (and do not put adapter layers in eval mode)")


def _check_supported(model: nn.Module, mode: str) -> None:
    """Raise :class:`UnsupportedLayerError` naming the first trainable layer Opacus can't handle."""
    for name, module in trainable_modules(model):
        buffers = [b for b, _ in module.named_buffers()]
        if buffers:
            raise UnsupportedLayerError(
                f"trainable layer {name!r} ({type(module).__name__}) has buffers {buffers[:3]}; "
                "Opacus cannot give exact per-example gradients for layers with state (e.g. "
                "BatchNorm). Freeze it or replace it (GroupNorm/LayerNorm)")
        errors = ModuleValidator.validate(module, strict=False)
        if errors:
            raise UnsupportedLayerError(
                f"trainable layer {name!r} ({type(module).__name__}) is not supported by Opacus "
                f"(grad_sample_mode={mode!r}): {errors[0]}. Freeze it or use a supported layer")


_STATEFUL_HINT = ("Put it in eval mode after model.train() (e.g. model.get_submodule({name!r})"
                  ".eval(), with running statistics) or replace it with GroupNorm/LayerNorm")


def _check_stateful_layers(model: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` for a layer, trainable or frozen, that mixes examples.

    In train mode a BatchNorm normalises with the statistics of the whole batch, so each
    example's output (and clipped gradient) depends on the other examples: per-example clipping
    then no longer bounds one example's influence. It also updates its running statistics from
    the private batch without noise. A BatchNorm without running statistics uses batch
    statistics in eval mode too. An InstanceNorm normalises each example alone, but with
    ``track_running_stats`` in train mode it updates running statistics from the batch.
    LayerNorm, GroupNorm, RMSNorm and non-persistent buffers (``position_ids``, rotary
    ``inv_freq``) keep no batch state and are not flagged.
    """
    for name, module in model.named_modules():
        label = f"layer {name or '<root>'!r} ({type(module).__name__})"
        hint = _STATEFUL_HINT.format(name=name)
        if isinstance(module, _BatchNorm):
            if module.training:
                raise UnsupportedLayerError(
                    f"{label} is in train mode, trainable or not: it normalises with the "
                    "statistics of the batch, which mixes examples and voids per-example "
                    f"clipping, and updates its running statistics from private data. {hint}")
            if not module.track_running_stats or module.running_mean is None:
                raise UnsupportedLayerError(
                    f"{label} has no running statistics, so it normalises with the statistics "
                    "of the batch even in eval mode, which mixes examples and voids "
                    "per-example clipping. Replace it with GroupNorm/LayerNorm")
        elif isinstance(module, _InstanceNorm) and module.track_running_stats \
                and module.training:
            raise UnsupportedLayerError(
                f"{label} tracks running statistics in train mode: they are updated from the "
                f"private batch without noise. {hint}, or set track_running_stats=False")


BufferVersions = dict[str, tuple[int, int]]


def _buffer_versions(model: nn.Module) -> BufferVersions:
    """``{name: (id, version counter)}`` of every buffer (an in-place change bumps the counter)."""
    out: BufferVersions = {}
    for name, buf in model.named_buffers():
        try:
            out[name] = (id(buf), buf._version)
        except RuntimeError:  # inference tensors have no version counter; they cannot change
            continue
    return out


def _check_buffers_unchanged(model: nn.Module, before: BufferVersions) -> None:
    """Raise :class:`UnsupportedLayerError` if a forward pass changed (or replaced) a buffer."""
    after = _buffer_versions(model)
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            owner, _, buf = name.rpartition(".")
            module = model.get_submodule(owner)
            raise UnsupportedLayerError(
                f"layer {owner or '<root>'!r} ({type(module).__name__}) changed its buffer "
                f"{buf!r} during a forward pass in train mode: it keeps state computed from "
                "the private batch, which DP-SGD's per-example clipping and noise do not "
                f"cover. {_STATEFUL_HINT.format(name=owner)} (or a layer without such state)")


def wrap_for_dp(model: nn.Module, dp_cfg: DPConfig) -> AbstractGradSampleModule:
    """Wrap ``model`` in the Opacus per-example gradient module of ``dp_cfg.grad_sample_mode``.

    The caller must :func:`unwrap` it (in a ``finally`` block) to remove every hook.
    """
    mode = dp_cfg.grad_sample_mode
    _check_supported(model, mode)
    try:
        if mode == "hooks":
            return GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        if mode == "functorch":
            return GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True,
                                    force_functorch=True)
        if mode == "ew":
            return GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="mean")
        if mode == "ghost":
            return GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="mean", strict=True,
                max_grad_norm=dp_cfg.max_grad_norm, use_ghost_clipping=True)
    except (NotImplementedError, ValueError) as exc:
        unwrap_module(model)
        raise UnsupportedLayerError(f"Opacus cannot wrap {type(model).__name__} in "
                                    f"grad_sample_mode={mode!r}: {exc}") from exc
    raise DPConfigError(f"grad_sample_mode={mode!r} is not one of hooks, functorch, ew, ghost")


def unwrap_module(model: nn.Module) -> None:
    """Remove every attribute Opacus may have left on ``model``'s modules and parameters."""
    for module in model.modules():
        handles = module.__dict__.get("autograd_grad_sample_hooks")
        if isinstance(handles, list):
            for handle in handles:
                handle.remove()
        for attr in OPACUS_MODULE_ATTRS:
            if attr in module.__dict__:
                delattr(module, attr)
    for p in model.parameters():
        for attr in OPACUS_PARAM_ATTRS:
            if attr in p.__dict__:
                delattr(p, attr)


def unwrap(wrapped: AbstractGradSampleModule, model: nn.Module) -> None:
    """Remove the Opacus hooks of ``wrapped`` and every attribute it attached to ``model``."""
    try:
        wrapped._close()  # removes hooks and grad_sample-like attributes (Opacus cleanup)
    finally:
        unwrap_module(model)


def _forward_losses(module: nn.Module, batch: Encoded, task: str) -> torch.Tensor:
    # Positional call: ExpandedWeights ("ew") reads the batch size from the first argument
    # and does not accept keyword arguments.
    out = module(batch.input_ids, batch.attention_mask, None, batch.token_type_ids)
    return per_example_loss(out.logits, batch.labels, task)


def poisson_batches(n: int, q: float, steps: int,
                    sampling: UniformSource) -> Iterator[list[int]]:
    """``steps`` Poisson batches of ``range(n)``: example ``i`` joins iff its uniform is ``< q``.

    Each step reads the next ``n`` uniforms of ``sampling`` (``DPRandomness.sampling``), so
    the batches are a function of the stream alone; sorted indices, possibly empty. This is
    Opacus' ``UniformWithReplacementSampler`` with the CSPRNG in place of ``torch.rand``.
    """
    for _ in range(steps):
        u = sampling.uniform(n)
        yield np.flatnonzero(u < q).tolist()  # security: membership from the CSPRNG


def _add_csprng_noise(opt: Any, noise_multiplier: float) -> None:
    """Opacus' ``add_noise`` with the noise drawn from ``opt.noise_source`` (the CSPRNG).

    ``opt.noise_source`` is the ``DPRandomness.noise`` stream passed to the optimiser; Opacus'
    ``_generate_noise`` (which would read ``opt.generator`` or torch's default generator) is
    never called.
    """
    std = noise_multiplier * opt.max_grad_norm
    hook: CanaryHook | None = getattr(opt, "canary_hook", None)
    if hook is not None:  # a white-box audit: canary gradients join the clipped sum
        hook.inject(opt.params, [p.summed_grad for p in opt.params], float(opt.max_grad_norm))
    for p in opt.params:
        _check_processed_flag(p.summed_grad)
        ref = p.summed_grad
        # security: noise from the CSPRNG stream, never a torch generator; with secure_mode (always
        # on in dp_local_train) each value is the floating-point mitigation, 4 draws summed / 2
        noise = opt.noise_source.gaussian(ref.shape, std, ref.dtype, device=ref.device,
                                          secure=opt.secure_mode)
        p.grad = (p.summed_grad + noise).view_as(p)
        _mark_as_processed(p.summed_grad)
    if hook is not None:  # the auditor sees each privatised sum (white box)
        hook.observe(opt.params, [p.grad for p in opt.params])


class CSPRNGDPOptimizer(DPOptimizer):  # type: ignore[misc]
    """Opacus ``DPOptimizer`` whose Gaussian noise comes from a CSPRNG stream.

    Only :meth:`add_noise` differs from Opacus: the noise is drawn from ``noise`` (in
    :func:`dp_local_train`, ``DPRandomness.noise``, a ChaCha20 stream), never from a
    ``torch.Generator``, torch's default generator or Opacus' own noise code, so Opacus'
    ``generator`` is left ``None`` and never read. ``secure_mode`` (default ``True``) is the
    4-draw floating-point mitigation, applied to the CSPRNG's noise.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise: GaussianSource,
                 secure_mode: bool = True, **kwargs: Any) -> None:
        super().__init__(optimizer, generator=None, secure_mode=secure_mode, **kwargs)
        self.noise_source = noise

    def add_noise(self) -> None:
        _add_csprng_noise(self, self.noise_multiplier)


class CSPRNGDPOptimizerFastGradientClipping(DPOptimizerFastGradientClipping):  # type: ignore[misc]
    """Opacus' ghost-clipping optimiser with the noise of :class:`CSPRNGDPOptimizer`.

    The noise comes from ``noise`` (the CSPRNG), never from a torch generator. Like Opacus, the
    noise std uses ``_adjusted_noise_multiplier`` when it is set (adaptive clipping), else
    ``noise_multiplier``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise: GaussianSource,
                 secure_mode: bool = True, **kwargs: Any) -> None:
        super().__init__(optimizer, generator=None, secure_mode=secure_mode, **kwargs)
        self.noise_source = noise

    def add_noise(self) -> None:
        adjusted = getattr(self, "_adjusted_noise_multiplier", None)
        _add_csprng_noise(self, float(self.noise_multiplier if adjusted is None else adjusted))


def dp_local_train(
    model: AdaptedModel,
    data: Encoded,
    train_cfg: TrainConfig,
    dp_cfg: DPConfig,
    *,
    noise_multiplier: float,
    randomness: DPRandomness,
    progress: Progress | None = None,
    canaries: CanaryHook | None = None,
) -> DPTrainResult:
    """DP-SGD local training of the adapter for ``train_cfg.local_steps`` logical steps.

    ``train_cfg`` gives the optimiser, learning rate and number of steps (its ``batch_size``
    is not used: the expected batch size is ``dp_cfg.expected_batch_size``). The model must
    be in train mode. ``noise_multiplier`` is sigma (resolved by the caller, e.g. with
    :meth:`DPConfig.resolve_noise_multiplier`, and reserved in the ledger before calling).
    ``randomness`` gives the Poisson sampling and the noise: ``DPRandomness.from_os()`` in
    production, one per client and round (see "Randomness" in the module docstring).
    ``canaries`` (a white-box audit only, :mod:`fedpeft.privacy.auditing.gradient_canaries`):
    its included canaries join the clipped sum before each step's noise, and it scores the
    privatised sums.

    Raises :class:`DPConfigError` (disabled config, bad sigma, q outside (0, 1)),
    :class:`DPTrainingError` (eval mode, no trainable parameters, ``randomness`` not a
    :class:`DPRandomness`), :class:`UnsupportedLayerError` (a layer Opacus cannot handle, or a
    stateful layer such as a BatchNorm in train mode anywhere in the model) and
    :class:`fedpeft.core.errors.ClientFault` (non-finite loss).
    """
    if not dp_cfg.enabled:
        raise DPConfigError("dp_cfg.enabled=False: call fedpeft.training.trainer.local_train for "
                            "non-private training, or enable DP")
    n = len(data)
    if n == 0:
        raise DataError("cannot train on zero examples")
    q = dp_cfg.sample_rate(n)
    sigma = validate_noise_multiplier(noise_multiplier)
    if not isinstance(randomness, DPRandomness):
        raise DPTrainingError(f"randomness={type(randomness).__name__} must be a DPRandomness: "
                              "pass fedpeft.privacy.csprng.DPRandomness.from_os() (one per client and "
                              "round; from_seed() only in tests)")
    _check_train_mode(model)
    _check_stateful_layers(model)
    params = list(model.adapter_parameters().values())
    if not params:
        raise DPTrainingError(f"model {type(model).__name__} has no trainable parameters; "
                              "DP-SGD trains the adapter only")
    task = model.task
    steps = train_cfg.local_steps
    physical = dp_cfg.physical_batch_size
    ghost = dp_cfg.grad_sample_mode == "ghost"
    result = DPTrainResult(
        steps=0, examples=n,
        event=PoissonSampledGaussianEvent(sample_rate=q, noise_multiplier=sigma, steps=steps),
        clip_norm=float(dp_cfg.max_grad_norm), expected_batch_size=dp_cfg.expected_batch_size,
        batch_sizes=[], randomness_kind=randomness.kind)
    start = time.perf_counter()
    lengths = data.lengths()
    for p in params:
        p.grad = None
    wrapped = wrap_for_dp(model, dp_cfg)
    try:
        base_opt = make_optimizer(model.adapter_parameters(), train_cfg)
        opt_type = CSPRNGDPOptimizerFastGradientClipping if ghost else CSPRNGDPOptimizer
        optimizer = opt_type(base_opt, noise=randomness.noise, secure_mode=True,
                             noise_multiplier=sigma, max_grad_norm=float(dp_cfg.max_grad_norm),
                             expected_batch_size=dp_cfg.expected_batch_size,
                             loss_reduction="mean")
        optimizer.canary_hook = canaries
        optimizer.zero_grad(set_to_none=True)
        buffers = _buffer_versions(model)
        for step, logical in enumerate(poisson_batches(n, q, steps, randomness.sampling)):
            # Near-equal physical chunks like Opacus' BatchSplittingSampler, shortest rows
            # first so each chunk is cut to its own longest row; noise is added once per
            # logical step, so the chunking never changes the mechanism.
            chunks = length_sorted_chunks(logical, lengths, physical)
            loss_sum = 0.0
            for i, chunk in enumerate(chunks):
                optimizer.signal_skip_step(do_skip=i < len(chunks) - 1)
                if not chunk:
                    # Empty Poisson batch: zero clipped sum, the step adds pure noise.
                    for p in params:
                        if ghost:
                            p.grad = torch.zeros_like(p)
                        else:
                            p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]
                else:
                    batch = data.rows(torch.tensor(chunk, dtype=torch.long))
                    losses = _forward_losses(wrapped, batch, task)
                    _check_buffers_unchanged(model, buffers)  # before any update
                    total = float(losses.detach().sum())
                    if not math.isfinite(total):
                        raise ClientFault(f"training loss became {total / len(chunk)} at step "
                                          f"{step}; lower lr (now {train_cfg.lr})")
                    loss_sum += total
                    if ghost:
                        DPTensorFastGradientClipping(  # two backward passes
                            wrapped, optimizer, losses, "mean").backward()
                    else:
                        losses.mean().backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            result.steps += 1
            result.batch_sizes.append(len(logical))
            if logical:
                mean_loss = loss_sum / len(logical)
                result.losses.append(mean_loss)
            else:
                mean_loss = float("nan")
            if progress is not None:
                progress(step + 1, steps, mean_loss)
    finally:
        unwrap(wrapped, model)
        for p in params:
            p.grad = None
    model.eval()
    result.seconds = time.perf_counter() - start
    return result
