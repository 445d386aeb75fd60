"""Framework-free secure aggregation (SecAgg+, Bell et al. CCS 2020; Bonawitz et al. CCS 2017).

The coordinator learns only the sum of the clients' quantised updates. Pure state machines
over ``bytes`` messages; the Flower integration lives elsewhere (this package never imports flwr).
"""

from __future__ import annotations

from fedpeft.secagg.client import SecAggClient
from fedpeft.secagg.config import GraphPlan, SecAggConfig, abort_probability, plan_graph
from fedpeft.secagg.driver import InMemoryRun, run_in_memory
from fedpeft.secagg.errors import (
    AbortError,
    InfeasiblePlanError,
    MalformedMessageError,
    ModulusOverflowError,
    ProtocolError,
    RefusedError,
    SecAggConfigError,
    SecAggError,
    ShareDecryptionError,
    StageError,
    UpdateError,
)
from fedpeft.secagg.quantize import QuantizationPlan, plan_quantization, quantize
from fedpeft.secagg.server import AggregateResult, SecAggServer
from fedpeft.secagg.stages import Stage

__all__ = [
    "AbortError", "AggregateResult", "GraphPlan", "InMemoryRun", "InfeasiblePlanError",
    "MalformedMessageError", "ModulusOverflowError", "ProtocolError", "QuantizationPlan",
    "RefusedError", "SecAggClient", "SecAggConfig", "SecAggConfigError", "SecAggError",
    "SecAggServer", "ShareDecryptionError", "Stage", "StageError", "UpdateError",
    "abort_probability", "plan_graph", "plan_quantization", "quantize", "run_in_memory",
]
