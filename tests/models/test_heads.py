"""The mean-pooling classification head and batch trimming of padded rows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.core.errors import ConfigError
from fedpeft.core.heads import MeanPoolingClassifier, masked_mean
from fedpeft.core.models import ModelConfig, load_fresh
from fedpeft.data.tokenize import Encoded

MINILM = ModelConfig("minilm-l6", task="classification", num_hidden_layers=2)


def test_masked_mean_known_answer() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                           [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(masked_mean(hidden, mask), torch.tensor([[2.0, 3.0], [7.0, 8.0]]))


@pytest.mark.parametrize("pooling", ["mean", "mean-norm"])
def test_mean_pooling_matches_sentence_transformers_recipe(pooling: str) -> None:
    """Head input = the masked mean of the last hidden states, L2-normalised for mean-norm
    (sentence-transformers' Pooling + Normalize modules)."""
    cfg = ModelConfig("minilm-l6", task="classification", num_hidden_layers=2,
                      pooling=pooling)  # type: ignore[arg-type]
    base = load_fresh(cfg, seed=3)
    model = base.model
    assert isinstance(model, MeanPoolingClassifier)
    model.eval()
    x = base.tokenizer(["a fine film", "an utterly dull, lifeless and tedious two hours"],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model.encoder(**x).last_hidden_state
        m = x["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1)
        if pooling == "mean-norm":
            pooled = pooled / pooled.norm(dim=1, keepdim=True)
            assert not torch.allclose(pooled.norm(dim=1), (hidden * m).sum(1).norm(dim=1))
        expected = model.classifier(pooled)
        got = model(**x).logits
    assert torch.allclose(got, expected, atol=1e-6)


def test_default_pooling_is_normalised_mean() -> None:
    assert ModelConfig().pooling == "mean-norm"


def test_padding_does_not_change_the_logits() -> None:
    base = load_fresh(MINILM, seed=3)
    base.model.eval()
    tok = base.tokenizer
    short = tok(["a fine film"], return_tensors="pt")
    padded = tok(["a fine film"], return_tensors="pt", padding="max_length", max_length=24)
    with torch.no_grad():
        a = base.model(**short).logits
        b = base.model(**padded).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_pooling_model_keeps_the_architecture_head() -> None:
    base = load_fresh(ModelConfig("minilm-l6", task="classification", num_hidden_layers=2,
                                  pooling="model"))
    assert not isinstance(base.model, MeanPoolingClassifier)
    assert hasattr(base.model, "classifier")
    assert type(base.model).__name__ == "BertForSequenceClassification"


def test_the_head_is_drawn_from_the_seed() -> None:
    a = load_fresh(MINILM, seed=1).model.classifier.weight
    b = load_fresh(MINILM, seed=1).model.classifier.weight
    c = load_fresh(MINILM, seed=2).model.classifier.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_pooling_is_named() -> None:
    with pytest.raises(ConfigError, match="pooling='cls'"):
        ModelConfig("minilm-l6", task="classification", pooling="cls")  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6),
       causal=st.booleans(), data=st.data())
def test_rows_trims_only_padding(lengths: list[int], causal: bool, data: st.DataObject) -> None:
    width = 12
    n = len(lengths)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, ln in enumerate(lengths):
        ids[i, :ln] = torch.arange(1, ln + 1)
        mask[i, :ln] = 1
    labels = ids.masked_fill(mask == 0, -100) if causal else torch.arange(n)
    enc = Encoded(ids, mask, labels, torch.zeros_like(ids))
    pick = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    index = torch.tensor(pick)
    out = enc.rows(index)
    longest = max(lengths[i] for i in pick)
    assert out.input_ids.shape == (len(pick), longest)
    # nothing but padding was dropped, and what is kept is unchanged
    assert int(out.attention_mask.sum()) == int(mask[index].sum())
    assert torch.equal(out.input_ids, ids[index][:, :longest])
    assert out.token_type_ids is not None and out.token_type_ids.shape == out.input_ids.shape
    if causal:
        assert torch.equal(out.labels, labels[index][:, :longest])
    else:
        assert torch.equal(out.labels, labels[index])
