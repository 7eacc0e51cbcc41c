"""The task interface: data + prompt layout + answer + metrics. Torch-free (the control plane validates with it).

A task turns text into token ids itself (real-data tasks need token budgets: truncate the context, never the
question or the answer trigger), so it is built with a tokenizer. An Example is laid out as

    prompt = context + trigger          (trigger: the answer cue, e.g. "A=" or "\n\nAnswer:")
    read_twice prompt = context + context + trigger

Sets:
- train: `train_examples(seed)` yields an endless, deterministic stream for a training seed (fresh samples for
  generators, sampling with replacement from a fixed pool for datasets);
- val and test: `eval_set(split, n)` is fixed by the task's data seed alone, never by the training seed, and the
  three sets are disjoint where the task can guarantee it.
Metrics in the task's own unit come from `score(example, predicted_text)`, applied to greedy-decoded answers.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Literal

from pydantic import BaseModel, ConfigDict

from model.tokenizers import Tokenizer
from orchestrator.errors import UserError

Split = Literal["val", "test"]


class TaskError(UserError):
    """A user-facing task problem (bad parameters): one line, names the field."""


class DataUnavailable(TaskError):
    """The task's data cannot be found or built: one line naming the dataset and how to provide it."""


@dataclass(frozen=True)
class Example:
    context: str
    trigger: str
    answer: str
    context_ids: tuple[int, ...]
    trigger_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def prompt(self) -> str:
        return self.context + self.trigger

    def prompt_ids(self, read_twice: bool = False) -> tuple[int, ...]:
        ctx = self.context_ids * 2 if read_twice else self.context_ids
        return ctx + self.trigger_ids


class TaskParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Task(abc.ABC):
    name: ClassVar[str]
    Params: ClassVar[type[TaskParams]] = TaskParams
    primary_metric: ClassVar[str] = "tok_acc"  # metric the spec's threshold applies to unless it names another
    unit_metrics: ClassVar[tuple[str, ...]] = ()  # names returned by score()
    description: ClassVar[str] = ""
    # one line per metric the task reports (without the val_/test_ prefix): what it measures; `fsearch list tasks`
    metric_definitions: ClassVar[dict[str, str]] = {}

    @classmethod
    def metrics(cls) -> dict[str, str]:
        """{metric: one-line definition} for every metric a run of this task reports: the task's own from `score()`,
        then the worker's teacher-forced ones (a task's `exact` replaces the worker's)."""
        return {**cls.metric_definitions, **{k: v for k, v in WORKER_METRICS.items() if k not in cls.metric_definitions}}

    @classmethod
    def chance_levels(cls, params: TaskParams) -> dict[str, float]:
        """{metric: chance level} for the metrics whose chance level is exact for these params (see `chance_level`).
        A task overrides this; the default knows none."""
        return {}

    @classmethod
    def chance_level(cls, params: TaskParams | dict[str, Any] | None = None, metric: str | None = None) -> float | None:
        """The expected value of `metric` (default: the primary metric) for a guesser that knows the answer's
        format but nothing of the problem: each unit of the answer (a cell, a digit, an item, a bit) drawn
        uniformly from the values it can take. None where that number is not exact (it depends on the tokenizer,
        on the data's label distribution, or the metric is not a share of units). Torch-free: decisions use it
        to tell a tie at chance from a tie between two working models. Raises TaskError on invalid params."""
        if not isinstance(params, TaskParams):
            try:
                params = cls.Params(**(params or {}))
            except Exception as e:  # pydantic ValidationError -> one line
                raise TaskError(f"task {cls.name}: {_first_error(e)}") from None
        return cls.chance_levels(params).get(metric or cls.primary_metric)

    def __init__(self, params: dict[str, Any] | None, tokenizer: Tokenizer, data_seed: int = 0):
        try:
            self.params = self.Params(**(params or {}))
        except Exception as e:  # pydantic ValidationError -> one line
            raise TaskError(f"task {self.name}: {_first_error(e)}") from None
        self.tok = tokenizer
        self.data_seed = data_seed

    def make_example(self, context: str, trigger: str, answer: str, **meta: Any) -> Example:
        return Example(context, trigger, answer, tuple(self.tok.encode(context)), tuple(self.tok.encode(trigger)),
                       tuple(self.tok.encode(answer)), meta)

    def check_available(self) -> None:
        """Raise DataUnavailable if the data is not there. Synthetic tasks always have their data."""

    @abc.abstractmethod
    def train_examples(self, seed: int) -> Iterator[Example]: ...

    @abc.abstractmethod
    def eval_set(self, split: Split, n: int) -> list[Example]: ...

    def score(self, example: Example, predicted: str) -> dict[str, float]:
        """Unit metrics for one greedy-decoded answer; the worker averages them over the set."""
        return {}

    def max_lengths(self) -> tuple[int, int]:
        """Upper bounds (prompt tokens, answer tokens) for batch probing; default: measured on the val set."""
        ex = self.eval_set("val", 32)
        return max(len(e.prompt_ids(True)) for e in ex), max(len(e.answer_ids) for e in ex)


# what the worker's evaluation reports for every task (teacher-forced on the reference answer)
WORKER_METRICS: dict[str, str] = {
    "loss": "mean cross-entropy per answer token, teacher-forced (lower is better)",
    "tok_acc": "share of answer tokens whose argmax prediction, teacher-forced, is the reference token",
    "exact": "share of examples whose every answer token is predicted right, teacher-forced",
}

REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    if cls.name in REGISTRY:
        raise RuntimeError(f"task {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def _first_error(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        err = errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        return f"params.{loc}: {err.get('msg', '').removeprefix('Value error, ')}"
    return str(e).splitlines()[0]
