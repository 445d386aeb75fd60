"""Which examples each client trains on and which the coordinator evaluates on.

Deterministic from the run config and the number of partitions, so every process (coordinator,
each simulation worker, each edge client) derives the same split without talking to the others.
Corpora and partitions are cached per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fedpeft.core.errors import ConfigError, DataError
from fedpeft.data.canaries import CanarySet, make_canaries
from fedpeft.data.chitchat import load_chitchat
from fedpeft.data.config import DataConfig
from fedpeft.data.examples import Corpus, TextExample
from fedpeft.data.partition import PartitionConfig, partition
from fedpeft.data.paths import resolve_path
from fedpeft.data.shakespeare import load_tinyshakespeare
from fedpeft.data.textfiles import RenderChat, load_file, load_text_classification

# dataset -> (train file, eval file) for the shared benchmark data
FILES: dict[str, tuple[str, str]] = {
    "sst2": ("sst2_train.tsv", "sst2_dev.tsv"),
    "agnews": ("agnews_dev.tsv", "agnews_test.tsv"),
}


@dataclass(frozen=True)
class FederatedSplit:
    """Client partitions (indices into ``train``) and a held-out evaluation corpus."""

    train: Corpus
    partitions: tuple[tuple[int, ...], ...]
    eval: Corpus
    #: audit canaries (``audit-canaries`` > 0): each client's slots are appended to ``train``
    #: and to its partition (a canary or its filler: the size does not depend on the bits)
    canaries: CanarySet | None = None


#: Label counts of the built-in classification data sets (``num-labels = 0`` takes them).
BUILTIN_LABELS: dict[str, int] = {"sst2": 2, "agnews": 4}


@functools.lru_cache(maxsize=4)
def chat_renderer(model: str) -> RenderChat:
    """Render a chat (``messages``) with ``model``'s chat template, as the model was tuned."""
    from fedpeft.core.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"model {model!r} has no chat template, so chat-style JSON lines "
                        "('messages') cannot be rendered for it; use a chat model or a text "
                        "field (data-text-column)")

    def render(messages: list[dict[str, str]]) -> str:
        return str(tokenizer.apply_chat_template(messages, tokenize=False))

    return render


@functools.lru_cache(maxsize=8)
def _load_train(data: DataConfig) -> Corpus:
    if data.dataset == "chitchat":
        return load_chitchat()
    if data.dataset == "shakespeare":
        return load_tinyshakespeare(data.path or None)
    if data.dataset == "file":
        return load_data_file(data.path, data)
    train_file, _ = FILES[data.dataset]
    return load_text_classification(resolve_path(data.path or None, train_file))


def load_data_file(path: str, data: DataConfig, *, train: bool = True,
                   layout: dict[str, object] | None = None) -> Corpus:
    """A file read with ``data``'s knobs (the evaluation file's with ``train=False``); chats
    rendered with ``data.chat_model``'s template; ``layout`` receives what was detected."""
    causal = data.read_task == "causal_lm"
    model = data.chat_model
    render: RenderChat | None = None
    if causal and model:  # the tokenizer is loaded only if the file holds a chat
        def render(messages: list[dict[str, str]]) -> str:
            return chat_renderer(model)(messages)
    return load_file(path, data.file_spec() if train else data.eval_spec(),
                     "causal_lm" if causal else "classification", render_chat=render,
                     layout=layout)


def label_count(data: DataConfig) -> int | None:
    """How many labels the training data has (None: not a classification data set)."""
    if data.read_task != "classification":
        return None
    if data.dataset in BUILTIN_LABELS:
        return BUILTIN_LABELS[data.dataset]
    if data.dataset == "file":
        names = _load_train(data).label_names
        return None if names is None else len(names)
    return None


#: A full sentence has at least this many words (and ends in ``.``, ``!`` or ``?``).
SENTENCE_MIN_WORDS = 8


def is_full_sentence(text: str) -> bool:
    """Whether ``text`` is a full sentence rather than a phrase: it ends in ``.``, ``!`` or
    ``?`` and has at least :data:`SENTENCE_MIN_WORDS` words. SST-2's training split (and our
    ``sst2_dev.tsv``, the rest of it) holds every sentence's parse-tree phrases beside the
    sentence; the phrases rarely end in sentence punctuation. On ``sst2_dev.tsv`` this keeps
    1,094 of 6,735 rows, 18.9 words on average (GLUE's held-out dev sentences: about 19)."""
    t = text.strip()
    return bool(t) and t[-1] in ".!?" and len(t.split()) >= SENTENCE_MIN_WORDS


def _eval_subset(corpus: Corpus, data: DataConfig) -> Corpus:
    if data.eval_subset == "all":
        return corpus
    keep = [i for i, ex in enumerate(corpus.examples) if is_full_sentence(ex.text)]
    if not keep:
        raise DataError(f"eval-subset='sentences': the evaluation set {corpus.name!r} has no "
                        f"full sentence (ending in . ! or ? with >= {SENTENCE_MIN_WORDS} "
                        "words); use eval-subset='all'")
    return corpus.subset(keep, name=f"{corpus.name}-sentences")


@functools.lru_cache(maxsize=8)
def _load_eval_file(data: DataConfig) -> Corpus | None:
    if data.dataset in FILES:
        path = resolve_path(data.eval_path or None, FILES[data.dataset][1])
        return _eval_subset(load_text_classification(path), data)
    if data.eval_path:
        return _eval_subset(load_data_file(data.eval_path, data, train=False), data)
    return None


def _cap(indices: list[int], cap: int, rng: np.random.Generator) -> tuple[int, ...]:
    if len(indices) <= cap:
        return tuple(indices)
    return tuple(sorted(rng.choice(indices, size=cap, replace=False).tolist()))


@functools.lru_cache(maxsize=8)
def federated_split(data: DataConfig, num_partitions: int, seed: int) -> FederatedSplit:
    """Split the corpus into ``num_partitions`` client partitions plus an evaluation corpus.

    Natural partitions (one per user) give clients the users with the most examples; the
    evaluation set then comes from users no client has (held-out participants). Otherwise the
    evaluation set is the data set's own evaluation file, or 10% of the examples held out.
    """
    if num_partitions < 1:
        raise ConfigError(f"num_partitions={num_partitions} must be >= 1")
    corpus = _load_train(data)
    rng = np.random.default_rng(seed)
    eval_file = _load_eval_file(data)
    if eval_file is not None and eval_file.label_names != corpus.label_names:
        raise DataError(f"the evaluation file's labels {list(eval_file.label_names or ())} are "
                        f"not the training file's {list(corpus.label_names or ())}: set "
                        "data-label-names so that both files map labels alike (or fix eval-path)")
    if data.partitioner == "natural":
        if data.dataset == "file" and not data.user_column:
            raise ConfigError(f"partitioner='natural' gives one client per user, but "
                              f"data-path={data.path!r} has no user column: set "
                              "data-user-column, or partitioner='iid' or 'dirichlet'")
        users = partition(corpus, PartitionConfig(kind="natural", seed=seed,
                                                  min_examples=data.min_user_examples))
        if len(users) < num_partitions + (0 if eval_file else 1):
            raise DataError(f"dataset {data.dataset!r} has {len(users)} users (with at least "
                            f"data-min-user-examples={data.min_user_examples} examples), fewer "
                            f"than the {num_partitions} clients asked for (plus held-out users "
                            "for evaluation); use fewer clients, lower data-min-user-examples, "
                            "or partitioner='iid'")
        parts = [list(u) for u in users[:num_partitions]]
        if eval_file is None:
            held = [i for u in users[num_partitions:] for i in u]
            held_corpus = _eval_subset(corpus.subset(held, name=f"{corpus.name}-heldout-users"),
                                       data)
            eval_corpus = held_corpus.subset(range(min(len(held_corpus), data.eval_examples)),
                                             name=held_corpus.name)
        else:
            eval_corpus = eval_file
    else:
        indices = np.arange(len(corpus))
        if eval_file is None:
            perm = rng.permutation(len(corpus))
            n_eval = max(1, len(corpus) // 10)
            eval_corpus = _eval_subset(corpus.subset(sorted(perm[:n_eval].tolist()),
                                                     name=f"{corpus.name}-heldout"), data)
            indices = np.sort(perm[n_eval:])
        else:
            eval_corpus = eval_file
        sub = corpus.subset(indices.tolist(), name=corpus.name)
        local = partition(sub, PartitionConfig(kind=data.partitioner, num_clients=num_partitions,
                                               alpha=data.dirichlet_alpha, seed=seed))
        parts = [[int(indices[i]) for i in p] for p in local]
    if len(eval_corpus) > data.eval_examples:
        pick = np.random.default_rng(seed + 1).choice(len(eval_corpus), data.eval_examples,
                                                      replace=False)
        eval_corpus = eval_corpus.subset(sorted(pick.tolist()), name=eval_corpus.name)
    capped = tuple(_cap(p, data.max_examples_per_client, rng) for p in parts)
    if not data.canaries:
        return FederatedSplit(train=corpus, partitions=capped, eval=eval_corpus)
    canaries = make_canaries(data.canaries, task=corpus.task, num_labels=corpus.num_labels,
                             num_partitions=num_partitions, seed=seed)
    extra: list[TextExample] = []
    planted: list[tuple[int, ...]] = []
    for pid, part in enumerate(capped):  # after the cap: a slot is never dropped
        slots = canaries.planted(pid)
        start = len(corpus) + len(extra)
        extra.extend(slots)
        planted.append(part + tuple(range(start, start + len(slots))))
    train = Corpus(corpus.examples + tuple(extra), corpus.label_names, corpus.task,
                   f"{corpus.name}+canaries")
    return FederatedSplit(train=train, partitions=tuple(planted), eval=eval_corpus,
                          canaries=canaries)


def client_corpus(data: DataConfig, partition_id: int, num_partitions: int, seed: int) -> Corpus:
    """The examples of one client."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id={partition_id} is outside [0, {num_partitions})")
    split = federated_split(data, num_partitions, seed)
    indices = split.partitions[partition_id]
    if not indices:
        raise DataError(f"client partition {partition_id} of {num_partitions} has zero examples; "
                        "use fewer clients or a larger dirichlet-alpha")
    return split.train.subset(list(indices), name=f"{split.train.name}-client{partition_id}")
