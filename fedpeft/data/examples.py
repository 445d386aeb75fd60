"""Framework-free containers for text data: :class:`TextExample` and :class:`Corpus`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from fedpeft.core.errors import ConfigError, DataError

Task = Literal["causal_lm", "classification"]
TASKS: tuple[str, ...] = get_args(Task)


@dataclass(frozen=True, slots=True)
class TextExample:
    """One text, its class label (classification only) and the user who wrote it (if known)."""

    text: str
    label: int | None = None
    user: str | None = None


@dataclass(frozen=True)
class Corpus:
    """An immutable list of examples plus what is needed to interpret them.

    ``label_names[i]`` names label ``i``. A classification corpus needs a label on every example
    (within ``range(len(label_names))`` when names are given); a causal-LM corpus carries none.
    """

    examples: tuple[TextExample, ...]
    label_names: tuple[str, ...] | None
    task: Task
    name: str

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"Corpus task={self.task!r} is not one of {TASKS}; pick one of them.")
        if not isinstance(self.examples, tuple):
            raise ConfigError(
                f"Corpus examples must be a tuple, got {type(self.examples).__name__}; "
                "pass tuple(examples)."
            )
        if self.label_names is not None and len(set(self.label_names)) != len(self.label_names):
            raise ConfigError(f"Corpus label_names={self.label_names!r} has duplicates; make them unique.")
        if self.task == "classification":
            k = None if self.label_names is None else len(self.label_names)
            for i, ex in enumerate(self.examples):
                if ex.label is None or ex.label < 0 or (k is not None and ex.label >= k):
                    raise DataError(
                        f"Corpus {self.name!r}: example {i} has label={ex.label!r}, expected an int in "
                        f"[0, {k if k is not None else 'inf'}); fix the labels or label_names."
                    )
        else:
            for i, ex in enumerate(self.examples):
                if ex.label is not None:
                    raise DataError(
                        f"Corpus {self.name!r}: causal_lm example {i} has label={ex.label!r}; "
                        "causal-LM examples carry no label (use task='classification')."
                    )

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(ex.text for ex in self.examples)

    @property
    def users(self) -> tuple[str | None, ...]:
        return tuple(ex.user for ex in self.examples)

    @property
    def labels(self) -> tuple[int, ...]:
        """Labels of a classification corpus (raises :class:`DataError` for causal-LM corpora)."""
        out: list[int] = []
        for ex in self.examples:
            if ex.label is None:
                raise DataError(
                    f"Corpus {self.name!r} (task={self.task!r}) has unlabelled examples; "
                    "labels exist only for classification corpora."
                )
            out.append(ex.label)
        return tuple(out)

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)

    def subset(self, indices: Sequence[int], name: str | None = None) -> Corpus:
        """The corpus restricted to ``indices`` (in that order), e.g. one client's partition."""
        n = len(self.examples)
        picked: list[TextExample] = []
        for i in indices:
            if not 0 <= i < n:
                raise DataError(f"Corpus {self.name!r}: index {i} is out of range for {n} examples.")
            picked.append(self.examples[i])
        return Corpus(tuple(picked), self.label_names, self.task, self.name if name is None else name)
