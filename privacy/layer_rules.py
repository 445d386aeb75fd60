"""Per-example gradient rules for the adapter layers Opacus does not know, registered with
Opacus (hooks mode: gradients; ghost clipping: norms). Imported by :mod:`fedpeft.privacy.dp_sgd`
so the rules are in place whenever a model is wrapped for DP-SGD.

(IA)3's :class:`~fedpeft.peft_methods.ia3.ScaledLinear` (Liu et al., NeurIPS 2022): with
``y = W x + b`` and ``g`` the gradient at the layer's output,

* output scaling ``z = y * l``: ``dL/dl = sum_t g_t * y_t``;
* input scaling (feed-forward) ``z = W (x * l) + b``: ``dL/dl = sum_t (W^T g_t) * x_t``,

summed over the positions ``t`` of one example. tests/dp/test_dp_sgd.py checks them against a
batch of one to 1e-5 on both models.

``nn.Embedding`` under ghost clipping: Opacus 1.6's norm sampler
(``opacus/grad_sample/embedding_norm_sample.py``) calls ``view`` on the layer's input ids,
which fails on ids expanded over the batch (stride 0), as PEFT's prefix encoder looks its
tokens up; the rule here passes contiguous ids to Opacus' own function (same norms).
"""

from __future__ import annotations

import torch
from opacus.grad_sample.embedding_norm_sample import (  # type: ignore[import-untyped]
    compute_embedding_norm_sample,
)
from opacus.grad_sample.utils import (  # type: ignore[import-untyped]
    register_grad_sampler,
    register_norm_sampler,
)
from torch import nn

from fedpeft.peft_methods.ia3 import ScaledLinear


def _per_example(layer: ScaledLinear, activations: list[torch.Tensor],
                 backprops: torch.Tensor) -> torch.Tensor:
    """Per-example gradients of ``l`` with PEFT's shape: (n, 1, in) or (n, out, 1)."""
    x = activations[0].to(backprops.dtype)
    if layer.is_feedforward:
        g_in = backprops @ layer.base_layer.weight.to(backprops.dtype)  # W^T g per position
        out: torch.Tensor = torch.einsum("n...i,n...i->ni", g_in, x).unsqueeze(1)
        return out
    with torch.no_grad():
        y = layer.base_layer(x)
    out = torch.einsum("n...o,n...o->no", backprops, y.to(backprops.dtype)).unsqueeze(2)
    return out


@register_grad_sampler(ScaledLinear)  # type: ignore[untyped-decorator]
def _ia3_grad_sample(layer: ScaledLinear, activations: list[torch.Tensor],
                     backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of ``l`` (Opacus hooks mode)."""
    if not layer.ia3_l.requires_grad:
        return {}
    return {layer.ia3_l: _per_example(layer, activations, backprops)}


@register_norm_sampler(ScaledLinear)  # type: ignore[untyped-decorator]
def _ia3_norm_sample(layer: ScaledLinear, activations: list[torch.Tensor],
                     backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradient norms of ``l`` (Opacus ghost clipping; ``l`` is small, so the
    gradients are materialised)."""
    if not layer.ia3_l.requires_grad:
        return {}
    gs = _per_example(layer, activations, backprops)
    return {layer.ia3_l: gs.flatten(1).norm(dim=1)}


@register_norm_sampler(nn.Embedding)  # type: ignore[untyped-decorator]
def _embedding_norm_sample(layer: nn.Embedding, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus' embedding norms, with contiguous input ids (module docstring)."""
    out: dict[nn.Parameter, torch.Tensor] = compute_embedding_norm_sample(
        layer, [a.contiguous() for a in activations], backprops)
    return out


#: The layer types whose rules this module registers (importing it registers them).
RULES: tuple[type[nn.Module], ...] = (ScaledLinear, nn.Embedding)
