from __future__ import annotations

import pytest

from fedpeft.core.errors import ConfigError, UnknownNameError
from fedpeft.core.models import ModelConfig, resolve_source
from fedpeft.peft_methods import AdapterConfig, LoraSettings, PromptSettings
from fedpeft.runconfig.config import DEFAULTS, parse_run_config
from fedpeft.runconfig.presets import PRESETS, get_preset


def test_defaults_parse_and_pyproject_matches() -> None:
    import tomllib
    from pathlib import Path

    run = parse_run_config({})
    assert run.model.name == "smollm2-135m" and run.adapter.method == "lora"
    doc = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert doc["tool"]["flwr"]["app"]["config"] == DEFAULTS


def test_every_preset_parses() -> None:
    for preset in PRESETS.values():
        run = parse_run_config({**preset.config, "preset": preset.name})
        assert run.preset == preset.name


@pytest.mark.parametrize("flat, err, needle", [
    ({"lora-r": 0}, ConfigError, "rank r=0"),
    ({"lora-r": -2}, ConfigError, "rank r=-2"),
    ({"method": "dylora"}, UnknownNameError, "unknown adapter method 'dylora'"),
    ({"no-such-key": 1}, ConfigError, "unknown run config keys ['no-such-key']"),
    ({"num-rounds": "many"}, ConfigError, "num-rounds='many'"),
    ({"lr": 0}, ConfigError, "lr=0.0"),
    ({"dataset": "imagenet"}, UnknownNameError, "unknown dataset 'imagenet'"),
    ({"partitioner": "zipf"}, UnknownNameError, "unknown partitioner 'zipf'"),
    ({"aggregation": "krum"}, UnknownNameError, "unknown aggregation 'krum'"),
    ({"prompt-tokens": 0, "method": "prompt"}, ConfigError, "num_virtual_tokens=0"),
    ({"clients-per-round": 1, "min-clients": 2}, ConfigError, "below min-clients"),
    ({"dp-delta": 1.5}, ConfigError, "delta=1.5"),
    ({"dp-clip": 0}, ConfigError, "max_grad_norm=0.0"),
    ({"dp-noise-multiplier": -1.0}, ConfigError, "noise_multiplier=-1.0"),
    ({"dp-target-epsilon": 0.0}, ConfigError, "target_epsilon=0.0"),
    ({"secagg-bits": 7}, ConfigError, "bits=7"),
    ({"dataset": "file"}, ConfigError, "needs data-path"),
])
def test_bad_values_are_named(flat: dict[str, object], err: type[Exception], needle: str) -> None:
    with pytest.raises(err) as info:
        parse_run_config(flat)
    assert needle in str(info.value)


def test_ffa_lora_freezes_a() -> None:
    assert parse_run_config({"method": "ffa-lora"}).adapter.settings.freeze_a  # type: ignore[union-attr]
    assert AdapterConfig("ffa-lora", LoraSettings()).settings.freeze_a  # type: ignore[union-attr]


def test_adapter_settings_type_must_match_method() -> None:
    with pytest.raises(ConfigError, match="takes LoraSettings"):
        AdapterConfig("lora", PromptSettings())


def test_unknown_preset_and_model() -> None:
    with pytest.raises(UnknownNameError, match="known presets"):
        get_preset("nope")
    with pytest.raises(UnknownNameError, match="unknown model 'nope'"):
        resolve_source("nope")
    with pytest.raises(ConfigError, match="num_hidden_layers=0"):
        ModelConfig(num_hidden_layers=0)


def test_fingerprint_tracks_model_and_adapter_only() -> None:
    a = parse_run_config({})
    assert a.fingerprint() == parse_run_config({"lr": 0.5, "num-rounds": 9}).fingerprint()
    assert a.fingerprint() != parse_run_config({"lora-r": 4}).fingerprint()
    assert a.fingerprint() != parse_run_config({"num-hidden-layers": 2}).fingerprint()


def test_secagg_threshold_and_degree_knobs() -> None:
    run = parse_run_config({"secagg-threshold": 4, "secagg-degree": 6})
    assert run.secagg is not None and (run.secagg.threshold, run.secagg.degree) == (4, 6)
    with pytest.raises(ConfigError, match="set both or neither"):
        parse_run_config({"secagg-threshold": 4})
    with pytest.raises(ConfigError, match="2\\*threshold > degree"):
        parse_run_config({"secagg-threshold": 2, "secagg-degree": 6})


def test_privacy_and_secagg_are_on_by_default() -> None:
    run = parse_run_config({})
    assert run.dp.enabled and run.secagg is not None
    assert run.dp.target_epsilon == 8.0 and run.dp.epsilon_max == 8.0
    assert run.dp.planned_rounds == run.federation.num_rounds


def test_one_source_per_default() -> None:
    """A run-config knob that is one dataclass field takes that field's default, and every
    method knob its settings' default: the dataclasses and pyproject.toml cannot disagree."""
    from fedpeft.data.config import DataConfig
    from fedpeft.peft_methods.base import METHODS
    from fedpeft.runconfig.config import KNOB_FIELDS, FederationConfig
    from fedpeft.secagg.config import SecAggConfig
    from fedpeft.training.config import TrainConfig

    # the whole parse path of the default run config lands on the dataclasses' own defaults
    run = parse_run_config({})
    assert run.model == ModelConfig()
    assert run.data == DataConfig() and run.train == TrainConfig()
    assert run.federation == FederationConfig()
    assert run.secagg == SecAggConfig(clip=float(DEFAULTS["secagg-clip"]))
    assert run.dp.delta == DEFAULTS["dp-delta"] and run.dp.accountant == DEFAULTS["dp-accountant"]
    # every knob named after a field of its concern is read from that field
    for cls in (ModelConfig, DataConfig, TrainConfig, FederationConfig):
        for name in cls.__dataclass_fields__:
            key = name.replace("_", "-")
            # 0 encodes None (the model's own depth) / "from the data" (the label count)
            if key in DEFAULTS and key not in ("num-hidden-layers", "num-labels"):
                assert KNOB_FIELDS[key] == (cls, name), key
    for entry in METHODS.values():
        settings = entry.parse(DEFAULTS)
        assert entry.canonical(settings) == settings
        assert isinstance(settings, entry.settings_type)
        assert set(entry.knobs) <= set(DEFAULTS)
    assert parse_run_config({}).adapter.settings == LoraSettings()


def test_a_method_parses_its_own_knobs() -> None:
    from fedpeft.peft_methods.base import METHODS

    v = {**DEFAULTS, "lora-r": 4, "lora-targets": "q_proj, v_proj", "prompt-tokens": 3}
    assert METHODS["lora"].parse(v) == LoraSettings(r=4, target_modules=("q_proj", "v_proj"))
    assert METHODS["ffa-lora"].parse(v).freeze_a
    assert METHODS["prompt"].parse(v) == PromptSettings(num_virtual_tokens=3)


def test_grad_sample_mode_auto_is_the_methods_fastest_exact_engine() -> None:
    assert parse_run_config({"method": "lora"}).dp.grad_sample_mode == "ew"
    assert parse_run_config({"method": "ia3"}).dp.grad_sample_mode == "hooks"
    assert parse_run_config({"method": "ia3", "dp-grad-sample-mode": "ghost"}
                            ).dp.grad_sample_mode == "ghost"
    with pytest.raises(ConfigError, match="dp-grad-sample-mode='ew' cannot.*'ia3'"):
        parse_run_config({"method": "ia3", "dp-grad-sample-mode": "ew"})


@pytest.mark.parametrize("method", ["ia3", "bitfit"])
def test_methods_batched_training_cannot_route_are_refused_before_a_round(method: str) -> None:
    with pytest.raises(ConfigError, match=f"batch-clients=4: method '{method}'.*batch-clients = 1"):
        parse_run_config({"method": method, "batch-clients": 4})
    assert parse_run_config({"method": method}).cohort.clients == 1


def test_bottleneck_knobs_parse_and_it_batches_across_clients() -> None:
    from fedpeft.peft_methods.bottleneck import BottleneckSettings

    run = parse_run_config({"method": "bottleneck", "bottleneck-placement": "parallel",
                            "bottleneck-size": 16, "bottleneck-activation": "gelu",
                            "bottleneck-scaling": 4.0, "bottleneck-targets": "mlp, output",
                            "batch-clients": 4})
    assert run.adapter.settings == BottleneckSettings(
        placement="parallel", size=16, activation="gelu", scaling=4.0,
        target_modules=("mlp", "output"))
    assert run.cohort.clients == 4  # its tensors live in nn.Linear modules: routed per row
    assert run.dp.grad_sample_mode == "ew"
    with pytest.raises(ConfigError, match="bottleneck-placement='side'"):
        parse_run_config({"method": "bottleneck", "bottleneck-placement": "side"})
