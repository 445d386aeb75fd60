"""The methods benchmark's arithmetic and table (the measurements themselves run in its CLI)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.methods_bench import PAIRS, markdown, with_ratios


def _row(model: str, method: str, coords: int, step: float, rss: float) -> dict[str, Any]:
    return {"model": model, "method": method, "grad_sample_mode": "hooks", "coordinates": coords,
            "share_of_model": coords / 1e6, "upload_float32_bytes": 4 * coords,
            "upload_secagg_bytes": 2 * coords, "median_step_s": step, "peak_rss_mb": rss}


def test_every_method_on_both_models_except_bitfit_on_smollm() -> None:
    from benchmarks.methods_bench import VARIANTS
    from fedpeft.peft_methods.registry import METHODS

    assert {VARIANTS.get(a, (a, {}))[0] for _, a in PAIRS} == set(METHODS)
    assert {a for _, a in PAIRS} >= set(VARIANTS)
    assert ("smollm2-135m", "bitfit") not in PAIRS and ("minilm-l6", "bitfit") in PAIRS
    assert ("minilm-l6", "prefix") not in PAIRS and ("smollm2-135m", "prefix") in PAIRS


def test_ratios_are_against_lora_on_the_same_model_and_errors_are_shown() -> None:
    rows = with_ratios([_row("m", "lora", 100, 2.0, 1000.0), _row("m", "ia3", 25, 3.0, 1100.0),
                        _row("n", "lora", 10, 1.0, 10.0),
                        {"model": "n", "method": "bitfit", "error": "ModelError: no biases"}])
    ia3 = rows[1]
    assert ia3["coordinates_vs_lora"] == pytest.approx(0.25)
    assert ia3["step_vs_lora"] == pytest.approx(1.5)
    assert ia3["rss_vs_lora"] == pytest.approx(1.1)
    assert rows[2]["step_vs_lora"] == pytest.approx(1.0)
    md = markdown({"meta": {"quick": True, "layers": 2, "steps": 2,
                            "load_average_at_start": [0.1]}, "rows": rows})
    assert "| m | ia3 | hooks | 25 (0.00 %) | 0.25x |" in md
    assert "| n | bitfit | error: ModelError: no biases |" in md
