"""Which corpus a federation trains on and how it is split over clients (``[tool.flwr.app.config]``
keys ``dataset`` ... ``eval-examples``)."""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.core.errors import ConfigError, UnknownNameError

DATASETS = ("chitchat", "sst2", "agnews", "shakespeare", "file")
#: Which rows of the evaluation set count: all, or full sentences only
#: (:func:`fedpeft.data.federation.is_full_sentence`).
EVAL_SUBSETS = ("all", "sentences")


@dataclass(frozen=True)
class DataConfig:
    """Which corpus, how it is split over clients, and how much each client uses."""

    dataset: str = "chitchat"
    path: str = ""
    eval_path: str = ""
    partitioner: str = "natural"
    dirichlet_alpha: float = 0.5
    max_examples_per_client: int = 64
    eval_examples: int = 128
    #: ``"sentences"``: evaluate on the full sentences of the evaluation set only
    eval_subset: str = "all"
    #: audit canaries planted in clients' data (0: none; fedpeft.data.canaries)
    canaries: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise UnknownNameError(f"unknown dataset {self.dataset!r}; known: {DATASETS} "
                                   "('file' reads data-path)")
        if self.dataset == "file" and not self.path:
            raise ConfigError("dataset='file' needs data-path (a .tsv, .csv or .jsonl file)")
        if self.partitioner not in ("natural", "iid", "dirichlet"):
            raise UnknownNameError(f"unknown partitioner {self.partitioner!r}; known: "
                                   "natural, iid, dirichlet")
        if self.dirichlet_alpha <= 0:
            raise ConfigError(f"dirichlet-alpha={self.dirichlet_alpha} must be > 0")
        if self.max_examples_per_client < 1:
            raise ConfigError(f"max-examples-per-client={self.max_examples_per_client} must be >= 1")
        if self.eval_subset not in EVAL_SUBSETS:
            raise UnknownNameError(f"unknown eval-subset {self.eval_subset!r}; known: "
                                   f"{EVAL_SUBSETS}")
        if self.eval_examples < 1:
            raise ConfigError(f"eval-examples={self.eval_examples} must be >= 1")
        if isinstance(self.canaries, bool) or not isinstance(self.canaries, int) or (
                self.canaries < 0):
            raise ConfigError(f"audit-canaries={self.canaries!r} must be an integer >= 0 "
                              "(0: no audit)")
