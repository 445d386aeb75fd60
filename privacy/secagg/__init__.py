"""Framework-free secure aggregation (SecAgg+, Bell et al. CCS 2020; Bonawitz et al. CCS 2017).

The coordinator learns only the sum of the clients' quantised updates. Pure state machines
over ``bytes`` messages; the Flower integration lives elsewhere (this package never imports flwr).
"""

from __future__ import annotations

from privacy.secagg.client import SecAggClient
from privacy.secagg.config import GraphPlan, SecAggConfig, abort_probability, plan_graph
from privacy.secagg.driver import InMemoryRun, run_in_memory
from privacy.secagg.errors import (
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
from privacy.secagg.quantize import QuantizationPlan, plan_quantization, quantize
from privacy.secagg.server import AggregateResult, SecAggServer
from privacy.secagg.stages import Stage

__all__ = [
    "AbortError", "AggregateResult", "GraphPlan", "InMemoryRun", "InfeasiblePlanError",
    "MalformedMessageError", "ModulusOverflowError", "ProtocolError", "QuantizationPlan",
    "RefusedError", "SecAggClient", "SecAggConfig", "SecAggConfigError", "SecAggError",
    "SecAggServer", "ShareDecryptionError", "Stage", "StageError", "UpdateError",
    "abort_probability", "plan_graph", "plan_quantization", "quantize", "run_in_memory",
]
