"""Adapter methods on the real embedded models cut to 2 layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedpeft.core.errors import ConfigError, ModelError, PayloadError
from fedpeft.core.models import ModelConfig, load_fresh
from fedpeft.peft_methods import (
    AdapterConfig,
    BitFitSettings,
    BottleneckSettings,
    IA3Settings,
    LoraSettings,
    PrefixSettings,
    PromptSettings,
    build,
)
from fedpeft.peft_methods.bitfit import load_bitfit
from fedpeft.peft_methods.bottleneck import AdapterWrapper, load_bottleneck

MODELS = {
    "smollm2": ModelConfig("smollm2-135m", task="causal_lm", num_hidden_layers=2),
    "minilm": ModelConfig("minilm-l6", task="classification", num_hidden_layers=2),
    "minilm-cls-pooler": ModelConfig("minilm-l6", task="classification", num_hidden_layers=2,
                                     pooling="model"),
}
ADAPTERS = {
    "lora": AdapterConfig("lora", LoraSettings(r=4)),
    "prompt": AdapterConfig("prompt", PromptSettings(num_virtual_tokens=4)),
    "ia3": AdapterConfig("ia3", IA3Settings()),
    "bitfit": AdapterConfig("bitfit", BitFitSettings()),
    "bottleneck": AdapterConfig("bottleneck", BottleneckSettings(size=4)),
    "bottleneck-par": AdapterConfig("bottleneck", BottleneckSettings(placement="parallel", size=4,
                                                                     activation="gelu",
                                                                     scaling=4.0)),
    "prefix": AdapterConfig("prefix", PrefixSettings(num_virtual_tokens=4)),
}
#: (model, method) pairs that exist: SmolLM2 (Llama) has no bias terms for BitFit.
#: Prefix tuning is a decoder method (the classification models take no key/value cache).
PAIRS = [(m, a) for m in MODELS for a in ADAPTERS
         if not (m == "smollm2" and a == "bitfit") and not (m != "smollm2" and a == "prefix")]
#: What each method's trainable tensor names contain (besides the classification head).
TRAINABLE_MARK = {"lora": "lora_", "prompt": "prompt", "ia3": ".ia3_l", "bitfit": ".bias",
                  "bottleneck": ".adapter.", "bottleneck-par": ".adapter.",
                  "prefix": "prompt_encoder."}


def _inputs(model: object) -> dict[str, torch.Tensor]:
    tok = model.base_info.tokenizer  # type: ignore[attr-defined]
    return dict(tok(["hello world, how are you today", "short"], return_tensors="pt", padding=True))


@pytest.mark.parametrize(("model_name", "adapter_name"), PAIRS)
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
    fresh = load_fresh(MODELS[model_name], seed=7).model
    if adapter_name == "bitfit":  # not a PEFT method: the project's own format
        peft_model = load_bitfit(fresh, tmp_path)  # type: ignore[arg-type]
    elif adapter_name.startswith("bottleneck"):
        peft_model = load_bottleneck(fresh, tmp_path)  # type: ignore[arg-type]
    else:
        peft_model = PeftModel.from_pretrained(fresh, tmp_path)
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("adapter_name", list(ADAPTERS))
def test_only_adapter_tensors_are_trainable(adapter_name: str) -> None:
    m = build(MODELS["smollm2" if adapter_name == "prefix" else "minilm"], ADAPTERS[adapter_name])
    names = list(m.adapter_parameters())
    mark = TRAINABLE_MARK[adapter_name]
    assert names and all((mark in n) or ("classifier" in n) for n in names)
    assert any(mark in n for n in names)
    assert m.num_trainable() < 0.05 * m.num_total()
    embeddings = ("word_embeddings", "embed_tokens")
    frozen = [p for n, p in m.frozen_module().named_parameters()
              if any(e in n for e in embeddings)]
    assert frozen and not any(p.requires_grad for p in frozen)


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


def test_bitfit_needs_bias_terms_and_skips_unused_ones() -> None:
    with pytest.raises(ModelError, match="BitFit needs bias terms.*smollm2-135m.*none"):
        build(MODELS["smollm2"], ADAPTERS["bitfit"])
    mean = build(MODELS["minilm"], ADAPTERS["bitfit"]).adapter_parameters()
    pooled = build(MODELS["minilm-cls-pooler"], ADAPTERS["bitfit"]).adapter_parameters()
    # Mean pooling discards BERT's pooler: its bias gets no gradient, so it is not trained.
    assert not any("pooler" in n for n in mean)
    assert any("pooler" in n for n in pooled)
    some = build(MODELS["minilm"], AdapterConfig("bitfit", BitFitSettings(modules=("query",))))
    names = [n for n in some.adapter_parameters() if "classifier" not in n]
    assert names and all(n.endswith("query.bias") for n in names)
    with pytest.raises(ModelError, match="among modules"):
        build(MODELS["minilm"], AdapterConfig("bitfit", BitFitSettings(modules=("nope",))))


def test_bitfit_loader_refuses_what_does_not_fit(tmp_path: Path) -> None:
    m = build(MODELS["minilm"], ADAPTERS["bitfit"])
    m.export_peft(tmp_path / "ok")
    other = load_fresh(MODELS["minilm"], seed=0).model
    # a tensor of another shape: nothing is changed, the error names it
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "ok" / "adapter_model.safetensors"))
    name = next(n for n in tensors if n.endswith("query.bias"))
    tensors[name] = torch.zeros(3)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "fedpeft_adapter.json").write_text((tmp_path / "ok" / "fedpeft_adapter.json").read_text())
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(PayloadError, match=f"{name}: got \\(3,\\)"):
        load_bitfit(other, bad)
    assert all(torch.equal(before[n], p) for n, p in other.named_parameters())
    with pytest.raises(PayloadError, match="not a readable BitFit export"):
        load_bitfit(other, tmp_path / "missing")
    (bad / "fedpeft_adapter.json").write_text('{"method": "lora", "format": 1}')
    with pytest.raises(PayloadError, match="not a BitFit export"):
        load_bitfit(other, bad)


def test_ia3_scales_outputs_and_feedforward_inputs() -> None:
    from fedpeft.peft_methods.ia3 import ScaledLinear

    m = build(MODELS["smollm2"], ADAPTERS["ia3"])
    layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, ScaledLinear)}
    kinds = {n.rsplit(".", 1)[-1]: mod.is_feedforward for n, mod in layers.items()}
    assert kinds == {"k_proj": False, "v_proj": False, "down_proj": True}  # PEFT's Llama default
    x = torch.randn(2, 3, next(iter(layers.values())).base_layer.in_features)
    layer = next(mod for n, mod in layers.items() if n.endswith("k_proj"))
    with torch.no_grad():
        layer.ia3_l.fill_(2.0)
        torch.testing.assert_close(layer(x), 2.0 * layer.base_layer(x))
    with pytest.raises(ModelError, match="match no module"):
        build(MODELS["minilm"], AdapterConfig("ia3", IA3Settings(target_modules=("q_proj",))))
    with pytest.raises(ConfigError, match="ia3-feedforward needs ia3-targets"):
        IA3Settings(feedforward_modules=("down_proj",))


def _logits(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=x["input_ids"],
                                  attention_mask=x["attention_mask"]).logits
    return out


@pytest.mark.parametrize(("model_name", "adapter_name", "where"), [
    ("minilm", "bottleneck", {"attention.output": "residual-norm", "output": "residual-norm"}),
    ("minilm", "bottleneck-par", {"output": "residual-norm"}),
    ("smollm2", "bottleneck", {"self_attn.o_proj": "linear", "mlp.down_proj": "linear"}),
    ("smollm2", "bottleneck-par", {"mlp": "block"}),
])
def test_bottleneck_starts_as_the_base_model_at_the_papers_places(
        model_name: str, adapter_name: str, where: dict[str, str]) -> None:
    m = build(MODELS[model_name], ADAPTERS[adapter_name], seed=2)
    wrapped = {n: w for n, w in m.model.named_modules() if isinstance(w, AdapterWrapper)}
    layers = 2
    assert len(wrapped) == layers * len(where)
    for name, w in wrapped.items():
        suffix = name.split(".", 4)[-1] if model_name == "minilm" else name.split(".", 3)[-1]
        assert where[suffix] == w.kind, name
    x = _inputs(m)
    base = load_fresh(MODELS[model_name], seed=2).model
    # up starts at zero: the adapted model is the base model (Houlsby's near-identity init)
    torch.testing.assert_close(_logits(m.model, x), _logits(base, x), rtol=0, atol=0)
    with torch.no_grad():  # (not a constant: a LayerNorm after the adapter would remove it)
        for w in wrapped.values():
            w.adapter.up.bias.copy_(0.1 * torch.randn(w.adapter.up.bias.shape))
    assert not torch.allclose(_logits(m.model, x), _logits(base, x), atol=1e-3)
    # the widths: hidden -> size -> hidden, the scaling applied
    w = next(iter(wrapped.values()))
    hidden = m.model.config.hidden_size
    assert w.adapter.down.weight.shape == (4, hidden) and w.adapter.up.weight.shape == (hidden, 4)
    h = torch.randn(2, 3, hidden)
    with torch.no_grad():
        manual = w.adapter.up(w.adapter.act(w.adapter.down(h))) * w.adapter.scaling
    torch.testing.assert_close(w.adapter(h), manual)


def test_bottleneck_parallel_reads_the_sublayer_input_and_serial_its_output() -> None:
    from fedpeft.peft_methods.bottleneck import Bottleneck

    for placement in ("serial", "parallel"):
        settings = BottleneckSettings(placement=placement, size=3)
        lin = torch.nn.Linear(5, 5)
        adapter = Bottleneck(5, settings, torch.float32)
        with torch.no_grad():
            adapter.up.weight.normal_()
        wrapper = AdapterWrapper(lin, adapter, kind="linear", placement=placement)
        x = torch.randn(2, 5)
        with torch.no_grad():
            y = lin(x)
            want = y + adapter(y) if placement == "serial" else y + adapter(x)
            torch.testing.assert_close(wrapper(x), want)


def test_bottleneck_refusals_name_the_knob() -> None:
    with pytest.raises(ConfigError, match="bottleneck-placement='both'"):
        BottleneckSettings(placement="both")
    with pytest.raises(ConfigError, match="bottleneck-size=0"):
        BottleneckSettings(size=0)
    with pytest.raises(ConfigError, match="bottleneck-activation='swish'"):
        BottleneckSettings(activation="swish")
    with pytest.raises(ConfigError, match="bottleneck-scaling=nan"):
        BottleneckSettings(scaling=float("nan"))
    with pytest.raises(ModelError, match="match no module.*bottleneck-targets"):
        build(MODELS["minilm"], AdapterConfig("bottleneck",
                                              BottleneckSettings(target_modules=("q_proj",))))
    # BERT's pooler runs but is discarded under mean pooling: no gradient, refused
    with pytest.raises(ModelError, match="do not reach the model's output"):
        build(MODELS["minilm"], AdapterConfig("bottleneck",
                                              BottleneckSettings(target_modules=("pooler.dense",))))
    # a parallel adapter beside a linear layer of unequal widths has nowhere to add
    with pytest.raises(ModelError, match="equal input and output widths"):
        build(MODELS["smollm2"], AdapterConfig("bottleneck", BottleneckSettings(
            placement="parallel", target_modules=("gate_proj",))))
    # chosen targets: only those are wrapped
    m = build(MODELS["smollm2"], AdapterConfig("bottleneck",
                                               BottleneckSettings(target_modules=("o_proj",))))
    assert [n for n, _k in m.targets] == [f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)]


def test_bottleneck_loader_refuses_what_does_not_fit(tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    m = build(MODELS["minilm"], ADAPTERS["bottleneck"])
    m.export_peft(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "fedpeft_adapter.json").read_text())
    assert config["settings"] == {"placement": "serial", "size": 4, "activation": "relu",
                                  "scaling": 1.0}
    tensors = load_file(str(tmp_path / "ok" / "adapter_model.safetensors"))

    def export(name: str, cfg: dict[str, object], ts: dict[str, torch.Tensor]) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "fedpeft_adapter.json").write_text(json.dumps(cfg))
        save_file(ts, str(d / "adapter_model.safetensors"))
        return d

    other = load_fresh(MODELS["minilm"], seed=0).model
    before = {n: p.clone() for n, p in other.named_parameters()}
    modules_before = [n for n, _ in other.named_modules()]
    down = next(n for n in tensors if n.endswith("adapter.down.weight"))
    cases = [
        (export("shape", config, {**tensors, down: torch.zeros(5, 384)}),
         rf"{down}: got \(5, 384\)"),
        (export("missing", config, {k: v for k, v in tensors.items() if k != down}),
         "lacks adapter tensors"),
        (export("size", {**config, "settings": {**config["settings"], "size": 10**6}}, tensors),
         "bad settings"),
        (export("target", {**config, "targets": [["encoder.nope", "linear"]]}, tensors),
         "not a module of the model"),
        (export("kind", {**config, "targets": [[config["targets"][0][0], "linear"]]}, tensors),
         "is a residual-norm module"),
        (export("shape-of-target", {**config, "targets": [["x"]]}, tensors),
         "not \\[module name"),
        (tmp_path / "absent", "not a readable bottleneck adapter export"),
        (export("other", {**config, "method": "bitfit"}, tensors),
         "not a bottleneck adapter export"),
    ]
    for path, message in cases:
        with pytest.raises(PayloadError, match=message):
            load_bottleneck(other, path)
        # nothing changed: no module put in, no tensor written
        assert [n for n, _ in other.named_modules()] == modules_before
        assert all(torch.equal(before[n], p) for n, p in other.named_parameters())


def test_prefix_starts_as_real_tokens_and_refuses_encoders() -> None:
    """Known answer for the prefix layout: ``init="vocab"`` stores the frozen model's own keys
    and values of random tokens, so the prefixed model's logits equal the base model's on
    those tokens followed by the input."""
    m = build(MODELS["smollm2"], AdapterConfig("prefix", PrefixSettings(num_virtual_tokens=5)),
              seed=3)
    assert m.init_token_ids is not None and m.init_token_ids.shape == (1, 5)
    x = m.base_info.tokenizer(["hello world, how are you today"], return_tensors="pt")
    m.eval()
    with torch.no_grad():
        ours = m(x["input_ids"], x["attention_mask"]).logits
    base = load_fresh(MODELS["smollm2"], seed=3).model
    ids = torch.cat([m.init_token_ids, x["input_ids"]], dim=1)
    theirs = _logits(base, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[:, 5:]
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-5)
    # random init is PEFT's: it changes the output, by more than the known answer allows
    r = build(MODELS["smollm2"], AdapterConfig("prefix", PrefixSettings(num_virtual_tokens=5,
                                                                        init="random")), seed=3)
    r.eval()
    with torch.no_grad():
        assert not torch.allclose(r(x["input_ids"], x["attention_mask"]).logits, theirs,
                                  atol=1e-2)
    with pytest.raises(ModelError, match="prefix tuning needs a causal language model.*minilm"):
        build(MODELS["minilm"], AdapterConfig("prefix", PrefixSettings()))
    with pytest.raises(ConfigError, match="prefix-tokens=0"):
        PrefixSettings(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="prefix-init='text'"):
        PrefixSettings(init="text")
