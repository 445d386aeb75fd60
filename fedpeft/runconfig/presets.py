"""Named simulation presets: run-config overrides plus the federation size.

A preset is a bundle of ``[tool.flwr.app.config]`` values on top of the defaults (which have
differential privacy and secure aggregation on); command-line overrides go on top of both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedpeft.core.errors import UnknownNameError
from fedpeft.core.protocol import Scalar


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    clients: int
    config: dict[str, Scalar] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "chat-lora",
            "SmolLM2-135M + LoRA r=8 on q/v, chitchat with one client per participant, "
            "DP-SGD (epsilon 8 over the run) and secure aggregation",
            clients=5,
            config={"model": "smollm2-135m", "task": "causal_lm", "method": "lora",
                    "lora-r": 8, "lora-alpha": 16, "dataset": "chitchat",
                    "partitioner": "natural", "num-rounds": 3, "local-steps": 4,
                    "batch-size": 8, "lr": 0.001, "max-length": 64,
                    "max-examples-per-client": 64, "eval-examples": 64,
                    "dp-physical-batch": 2,  # keeps a SmolLM2 DP client near 1.6 GB RSS
                    "dp": True, "dp-target-epsilon": 8.0, "dp-delta": 1e-5, "dp-clip": 1.0,
                    "secagg": True, "weighting": "uniform", "secagg-dropout": 0.1},
        ),
        Preset(
            "chat-prompt",
            "SmolLM2-135M + 16-token soft prompt, chitchat with one client per participant, "
            "DP-SGD (epsilon 8) and secure aggregation",
            clients=5,
            config={"model": "smollm2-135m", "task": "causal_lm", "method": "prompt",
                    "prompt-tokens": 16, "dataset": "chitchat", "partitioner": "natural",
                    "num-rounds": 3, "local-steps": 4, "batch-size": 8, "lr": 0.01,
                    "max-length": 64, "max-examples-per-client": 64, "eval-examples": 64},
        ),
        Preset(
            "sst2-lora",
            "MiniLM-L6 + FFA-LoRA r=8 on query/value + a head on the normalised mean embedding, "
            "SST-2 (../shared/data) over 10 clients with Dirichlet(0.5) label skew, DP-SGD "
            "with momentum (epsilon 8), FedAvgM and secure aggregation",
            clients=10,
            # From the search in docs/results.md: a head on the L2-normalised mean embedding
            # with its own learning rate, FFA-LoRA (A frozen) trained by DP-SGD with momentum,
            # server momentum 0.5 (FedAvgM) and enough sequential DP steps (10 rounds x 6).
            # secagg-clip 16: the head's DP-SGD updates reach about 14 per coordinate, and
            # SecAgg's default clamp of 1 would bias their mean (docs/secagg.md).
            # Tuned for DP: without DP, the best found was plain LoRA with AdamW, lr 0.002,
            # head-lr 0.05, with the same server momentum.
            config={"model": "minilm-l6", "task": "classification", "num-labels": 2,
                    "pooling": "mean-norm", "method": "ffa-lora", "lora-r": 8,
                    "lora-alpha": 16, "optimizer": "sgd", "momentum": 0.9, "lr": 0.5,
                    "head-lr": 5.0, "aggregation": "fedavgm", "server-momentum": 0.5,
                    "dataset": "sst2", "partitioner": "dirichlet", "dirichlet-alpha": 0.5,
                    "num-rounds": 10, "local-steps": 6, "batch-size": 48,
                    "dp-clip": 1.0, "max-length": 64, "max-examples-per-client": 6100,
                    "eval-examples": 1500, "dp-physical-batch": 16,
                    "secagg-clip": 16.0},
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownNameError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None
