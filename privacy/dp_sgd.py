"""Record-level DP-SGD on the adapter tensors only (Abadi et al., CCS 2016), with Opacus.

:func:`dp_local_train` mirrors :func:`client.trainer.local_train` but each of the
``local_steps`` logical steps is one application of the Poisson-subsampled Gaussian mechanism:

1. Poisson sampling: every local example joins the batch independently with probability
   ``q = expected_batch_size / n`` (Opacus ``UniformWithReplacementSampler``). Batches have a
   random size and may be empty; an empty batch still yields a (pure-noise) step.
2. Per-example gradients of the per-example losses (``client.trainer.per_example_loss``) of
   the trainable adapter parameters only, by an Opacus ``GradSampleModule`` in the configured
   mode; frozen base weights get no per-example gradient.
3. Each per-example gradient is clipped to L2 norm ``C``; the clipped gradients are summed,
   Gaussian noise of std ``sigma * C`` is added, and the sum is divided by the *expected*
   batch size ``B`` (Opacus ``DPOptimizer`` with ``loss_reduction="mean"``), then the wrapped
   optimiser (``client.trainer.make_optimizer``) steps.

A logical batch larger than ``physical_batch_size`` is split into physical chunks exactly as
Opacus ``BatchMemoryManager`` does (``DPOptimizer.signal_skip_step``): clipped gradients are
accumulated over the chunks and noise is added once per logical step.

Opacus building blocks are used directly (``GradSampleModule`` + ``DPOptimizer`` + the Poisson
sampler), not ``PrivacyEngine``: no Opacus accountant runs here. Accounting is the ledger's job
(``privacy.accounting``): the returned :class:`DPTrainResult` carries the
``PoissonSampledGaussianEvent`` that describes what was run.

The shared model is left as it was found: hooks, ``grad_sample`` and the other attributes
Opacus attaches are removed in a ``finally`` block, parameters stay the same objects, and the
model is left in eval mode (as ``local_train`` leaves it).

Randomness
----------
Two random sources are used, and they are separate:

* **Batch sampling** (which examples join each Poisson batch) uses the ``generator`` argument,
  the same per-round generator that ``local_train`` uses for shuffling.
* **DP noise** is drawn by Opacus (``torch.normal`` in ``DPOptimizer.add_noise``) from
  ``noise_generator``. Tests pass a seeded ``torch.Generator`` to make the noise
  reproducible. Production passes ``None``, which is Opacus' default: the noise then comes
  from PyTorch's default generator of the parameters' device (a Mersenne Twister on CPU,
  Philox on CUDA). That generator is not cryptographically secure. Its state is
  not seeded from a public value by fedpeft (model loading restores it), but any
  ``torch.manual_seed`` call elsewhere in the process makes the noise predictable to whoever
  knows that seed, so never seed the global generator from a public value (such as the run
  config's ``seed``) in a process that trains privately, and never pass a
  ``noise_generator`` seeded from a public value in production.
* Opacus' ``secure_mode`` (a CSPRNG via ``torchcsprng`` and noise robust to floating-point
  attacks, Mironov 2012 / Haney et al. 2022) is **off**: ``torchcsprng`` has no release for
  current PyTorch. The guarantee therefore holds for an idealised Gaussian; the
  floating-point attacks are not mitigated. Opacus' own "Secure RNG turned off" warning is
  issued only by ``PrivacyEngine``, which this module does not use; it is not filtered
  anywhere in fedpeft.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from opacus.grad_sample import (  # type: ignore[import-untyped]
    GradSampleModule,
    GradSampleModuleExpandedWeights,
    GradSampleModuleFastGradientClipping,
)
from opacus.grad_sample.gsm_base import AbstractGradSampleModule  # type: ignore[import-untyped]
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping  # type: ignore[import-untyped]
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping  # type: ignore[import-untyped]
from opacus.utils.module_utils import trainable_modules  # type: ignore[import-untyped]
from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # type: ignore[import-untyped]
from opacus.validators import ModuleValidator  # type: ignore[import-untyped]
from torch import nn

from client.trainer import (
    Progress,
    TrainResult,
    length_sorted_chunks,
    make_optimizer,
    per_example_loss,
)
from fedpeft.config import TrainConfig
from fedpeft.errors import ClientFault, DataError
from fedpeft.tokenize import Encoded
from peft_methods.base import AdaptedModel
from privacy.accounting.events import PoissonSampledGaussianEvent, validate_noise_multiplier
from privacy.dp_config import DPConfig, DPConfigError, DPTrainingError, UnsupportedLayerError

__all__ = [
    "DPConfig", "DPConfigError", "DPTrainResult", "DPTrainingError", "UnsupportedLayerError",
    "dp_local_train", "wrap_for_dp", "unwrap", "OPACUS_PARAM_ATTRS", "OPACUS_MODULE_ATTRS",
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
    or evaluation metrics).
    """

    event: PoissonSampledGaussianEvent
    clip_norm: float
    expected_batch_size: int
    batch_sizes: list[int]

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


def _logical_batches(n: int, q: float, steps: int,
                     generator: torch.Generator) -> Iterator[list[int]]:
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=generator,
                                            steps=steps)
    yield from sampler


def dp_local_train(
    model: AdaptedModel,
    data: Encoded,
    train_cfg: TrainConfig,
    dp_cfg: DPConfig,
    *,
    noise_multiplier: float,
    generator: torch.Generator,
    noise_generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> DPTrainResult:
    """DP-SGD local training of the adapter for ``train_cfg.local_steps`` logical steps.

    ``train_cfg`` gives the optimiser, learning rate and number of steps (its ``batch_size``
    is not used: the expected batch size is ``dp_cfg.expected_batch_size``). The model must
    be in train mode. ``noise_multiplier`` is sigma (resolved by the caller, e.g. with
    :meth:`DPConfig.resolve_noise_multiplier`, and reserved in the ledger before calling).
    ``generator`` drives Poisson sampling; ``noise_generator`` the Gaussian noise (``None``:
    PyTorch's default generator, see "Randomness" in the module docstring).

    Raises :class:`DPConfigError` (disabled config, bad sigma, q outside (0, 1)),
    :class:`DPTrainingError` (eval mode, no trainable parameters), :class:`UnsupportedLayerError`
    and :class:`fedpeft.errors.ClientFault` (non-finite loss).
    """
    if not dp_cfg.enabled:
        raise DPConfigError("dp_cfg.enabled=False: call client.trainer.local_train for "
                            "non-private training, or enable DP")
    n = len(data)
    if n == 0:
        raise DataError("cannot train on zero examples")
    q = dp_cfg.sample_rate(n)
    sigma = validate_noise_multiplier(noise_multiplier)
    _check_train_mode(model)
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
        batch_sizes=[])
    start = time.perf_counter()
    lengths = data.lengths()
    for p in params:
        p.grad = None
    wrapped = wrap_for_dp(model, dp_cfg)
    try:
        base_opt = make_optimizer(model.adapter_parameters(), train_cfg)
        opt_type = DPOptimizerFastGradientClipping if ghost else DPOptimizer
        optimizer = opt_type(base_opt, noise_multiplier=sigma,
                             max_grad_norm=float(dp_cfg.max_grad_norm),
                             expected_batch_size=dp_cfg.expected_batch_size,
                             loss_reduction="mean", generator=noise_generator,
                             secure_mode=False)
        optimizer.zero_grad(set_to_none=True)
        for step, logical in enumerate(_logical_batches(n, q, steps, generator)):
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
