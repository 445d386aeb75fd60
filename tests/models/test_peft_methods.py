"""Adapter methods on the real embedded models cut to 2 layers."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from fedpeft.core.errors import ModelError, PayloadError
from fedpeft.core.models import ModelConfig, load_fresh
from fedpeft.peft_methods import AdapterConfig, LoraSettings, PromptSettings, build

MODELS = {
    "smollm2": ModelConfig("smollm2-135m", task="causal_lm", num_hidden_layers=2),
    "minilm": ModelConfig("minilm-l6", task="classification", num_hidden_layers=2),
    "minilm-cls-pooler": ModelConfig("minilm-l6", task="classification", num_hidden_layers=2,
                                     pooling="model"),
}
ADAPTERS = {
    "lora": AdapterConfig("lora", LoraSettings(r=4)),
    "prompt": AdapterConfig("prompt", PromptSettings(num_virtual_tokens=4)),
}


def _inputs(model: object) -> dict[str, torch.Tensor]:
    tok = model.base_info.tokenizer  # type: ignore[attr-defined]
    return dict(tok(["hello world, how are you today", "short"], return_tensors="pt", padding=True))


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("adapter_name", list(ADAPTERS))
def test_export_round_trip_same_logits(model_name: str, adapter_name: str, tmp_path: object) -> None:
    m = build(MODELS[model_name], ADAPTERS[adapter_name], seed=1)
    with torch.no_grad():  # move away from the init so the test can see a wrong load
        for p in m.adapter_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)
    x = _inputs(m)
    m.eval()
    with torch.no_grad():
        ours = m(x["input_ids"], x["attention_mask"]).logits
    m.export_peft(tmp_path)  # type: ignore[arg-type]
    peft_model = PeftModel.from_pretrained(load_fresh(MODELS[model_name], seed=7).model, tmp_path)
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("adapter_name", list(ADAPTERS))
def test_only_adapter_tensors_are_trainable(adapter_name: str) -> None:
    m = build(MODELS["minilm"], ADAPTERS[adapter_name])
    names = list(m.adapter_parameters())
    assert names and all(("lora_" in n) or ("classifier" in n) or n.startswith("prompt") for n in names)
    assert m.num_trainable() < 0.05 * m.num_total()
    frozen = [n for n, p in m.frozen_module().named_parameters() if "word_embeddings" in n]
    assert frozen and not any(p.requires_grad for n, p in m.frozen_module().named_parameters()
                              if "word_embeddings" in n)


def test_load_adapter_state_checks_spec() -> None:
    m = build(MODELS["minilm"], ADAPTERS["lora"])
    state = m.adapter_state()
    bad = dict(state)
    first = next(iter(bad))
    bad[first] = torch.zeros(3, 3)
    with pytest.raises(PayloadError, match="do not match"):
        m.load_adapter_state(bad)
    del bad[first]
    with pytest.raises(PayloadError, match="missing"):
        m.load_adapter_state(bad)


def test_missing_target_modules_are_named() -> None:
    with pytest.raises(ModelError, match=r"\['q_proj'\] are not linear layers.*available"):
        build(MODELS["minilm"], AdapterConfig("lora", LoraSettings(target_modules=("q_proj",))))


def test_ffa_lora_trains_only_b() -> None:
    m = build(MODELS["smollm2"], AdapterConfig("ffa-lora", LoraSettings(r=2)))
    names = list(m.adapter_parameters())
    assert names and all("lora_B" in n for n in names)


def test_prompt_gives_each_example_its_own_activation() -> None:
    """The prompt is looked up per example (the DP-safe path), not broadcast once."""
    m = build(MODELS["smollm2"], ADAPTERS["prompt"])
    seen: list[torch.Size] = []
    handle = m.prompt.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    x = _inputs(m)
    with torch.no_grad():
        m(x["input_ids"], x["attention_mask"])
    handle.remove()
    assert seen == [torch.Size([2, 4])]


def test_base_weights_are_frozen_and_shared_cache_loads_once() -> None:
    from fedpeft.core.models import load_base

    a = load_base(MODELS["minilm"])
    b = load_base(MODELS["minilm"])
    assert a is b
    assert not any(p.requires_grad for p in a.model.parameters())
