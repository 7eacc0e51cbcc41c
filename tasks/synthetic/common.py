"""What every synthetic task shares: drawing problems, the val/test/train split, fixed-width answer reading.

Split scheme (the same for every synthetic task)
------------------------------------------------
A generator draws a `Problem` whose `key` is a layout-independent string naming the problem (the sudoku puzzle,
the document and query of a retrieval, ...). The key is hashed together with the task name and the data seed
(BLAKE2b, 64 bits, mapped to u in [0, 1)):

    u <  f        -> the problem belongs to the validation set
    f <= u < 2f   -> the problem belongs to the test set
    2f <= u       -> the problem may appear in training

with f = `holdout_fraction` (default 1/32). Consequences:
- val, test and train are disjoint by construction, also for small (finite) problem spaces: the training stream
  draws fresh problems and rejects those that hash into the val or test part;
- the split depends on the data seed only, never on the training seed; two layouts of one task (question_first
  and question_last) hold out the same problems, and their eval sets hold the same problems in the same order;
- `eval_set(split, n)` draws from an RNG fixed by (task, data seed, split), keeps the problems of its part and
  drops repeats, so a set holds n distinct problems and `eval_set(s, m)` is a prefix of `eval_set(s, n)` for m <= n.
  When the part is too small to hold n distinct problems the call fails with a TaskError instead of repeating.
Every Example carries its problem key as `meta["key"]`.

Answers
-------
Every synthetic answer has a length fixed by the parameters, so a prediction is read as its first len(answer)
characters: text after that is ignored and missing characters count as wrong (`fixed_width`).
"""
from __future__ import annotations

import abc
import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

from pydantic import Field

from model.tokenizers import Tokenizer
from tasks.base import Example, Split, Task, TaskError, TaskParams

DEFAULT_HOLDOUT_FRACTION = 1 / 32
SPLITS: tuple[Split, ...] = ("val", "test")
# eval-set draws allowed before giving up: (EVAL_DRAWS_PER_EXAMPLE * n + EVAL_DRAWS_EXTRA) / holdout_fraction
EVAL_DRAWS_PER_EXAMPLE = 10
EVAL_DRAWS_EXTRA = 200
# consecutive held-out draws after which the training stream gives up (only a degenerate space gets there)
TRAIN_MAX_CONSECUTIVE_REJECTS = 10_000
MISSING = "\0"  # pads a short prediction; never equal to an answer character

DIGITS = "0123456789"
BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


class SyntheticParams(TaskParams):
    holdout_fraction: float = Field(DEFAULT_HOLDOUT_FRACTION, gt=0.0, le=0.25,
                                    description="share of the problem space held out for val, and again for test")


@dataclass(frozen=True)
class Problem:
    key: str  # layout-independent identity: hashed for the split, compared for repeats
    context: str
    trigger: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def split_of(task_name: str, data_seed: int, key: str, holdout_fraction: float) -> str:
    """'val', 'test' or 'train' for a problem key (see the module docstring)."""
    digest = hashlib.blake2b(f"{task_name}|{data_seed}|{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    if u < holdout_fraction:
        return "val"
    if u < 2 * holdout_fraction:
        return "test"
    return "train"


def fixed_width(predicted: str, width: int) -> str:
    """The first `width` characters of a prediction, padded with MISSING when it is shorter."""
    return predicted[:width].ljust(width, MISSING)


def char_accuracy(predicted: str, answer: str, positions: list[int] | range | None = None) -> float:
    """Share of answer characters (or of the given positions) that the prediction reproduces."""
    pred = fixed_width(predicted, len(answer))
    idx = range(len(answer)) if positions is None else positions
    return sum(pred[i] == answer[i] for i in idx) / max(len(idx), 1)


def char_and_exact(predicted: str, answer: str) -> dict[str, float]:
    """`char_acc` and `exact` of a prediction against a fixed-width answer."""
    return {"char_acc": char_accuracy(predicted, answer), "exact": float(fixed_width(predicted, len(answer)) == answer)}


CHAR_AND_EXACT_DEFINITIONS = {
    "char_acc": "share of the answer's digits predicted right, position by position",
    "exact": "share of predictions equal to the answer",
}


def digit_chance_levels(n_digits: int) -> dict[str, float]:
    """`char_acc` and `exact` at chance: each of the answer's `n_digits` digits guessed uniformly (1/10)."""
    return {"char_acc": 0.1, "exact": 0.1 ** n_digits}


def random_digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(DIGITS, k=n))


def base36(i: int, width: int) -> str:
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = BASE36[r] + out
        if i == 0:
            return out.rjust(width, "0")


class SyntheticTask(Task):
    """A generated, fixed-format task: subclasses implement `draw` (one problem from an RNG) and `text_lengths`."""

    Params = SyntheticParams

    def __init__(self, params: dict[str, Any] | None, tokenizer: Tokenizer, data_seed: int = 0):
        super().__init__(params, tokenizer, data_seed)
        self._eval_cache: dict[str, list[Example]] = {}

    # -- what a task provides ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def draw(self, rng: random.Random) -> Problem:
        """One problem, drawn with `rng` only."""

    @abc.abstractmethod
    def text_lengths(self) -> tuple[int, int, int]:
        """Characters of (context, trigger, answer): fixed by the parameters for every problem."""

    # -- sets ---------------------------------------------------------------------------------------------------
    def split_of(self, key: str) -> str:
        return split_of(self.name, self.data_seed, key, self.params.holdout_fraction)

    def example(self, problem: Problem) -> Example:
        return self.make_example(problem.context, problem.trigger, problem.answer, key=problem.key, **problem.meta)

    def train_examples(self, seed: int) -> Iterator[Example]:
        rng = random.Random(f"{self.name}|train|{seed}")
        rejects = 0
        while True:
            problem = self.draw(rng)
            if self.split_of(problem.key) != "train":
                rejects += 1
                if rejects > TRAIN_MAX_CONSECUTIVE_REJECTS:
                    raise TaskError(f"task {self.name}: {rejects} training draws in a row were held out; "
                                    f"the problem space of these params is too small")
                continue
            rejects = 0
            yield self.example(problem)

    def eval_set(self, split: Split, n: int) -> list[Example]:
        if split not in SPLITS:
            raise TaskError(f"task {self.name}: unknown eval split {split!r}; known: {', '.join(SPLITS)}")
        cached = self._eval_cache.get(split, [])
        if len(cached) < n:
            cached = self._draw_eval_set(split, n)
            self._eval_cache[split] = cached
        return cached[:n]

    def _draw_eval_set(self, split: Split, n: int) -> list[Example]:
        frac = self.params.holdout_fraction
        max_draws = math.ceil((EVAL_DRAWS_PER_EXAMPLE * n + EVAL_DRAWS_EXTRA) / frac)
        rng = random.Random(f"{self.name}|{self.data_seed}|{split}")
        seen: set[str] = set()
        out: list[Example] = []
        for _ in range(max_draws):
            if len(out) == n:
                return out
            problem = self.draw(rng)
            if problem.key in seen or self.split_of(problem.key) != split:
                continue
            seen.add(problem.key)
            out.append(self.example(problem))
        if len(out) == n:
            return out
        raise TaskError(f"task {self.name}: found only {len(out)} distinct {split} problems in {max_draws} draws "
                        f"(wanted {n}); the problem space is too small: ask for fewer or raise "
                        f"params.holdout_fraction (now {frac:g})")

    def max_lengths(self) -> tuple[int, int]:
        """(read-twice prompt, answer) in tokens. Exact for the byte tokenizer; an upper bound for any tokenizer
        whose tokens cover at least one byte each (World), since every synthetic text is ASCII of fixed length."""
        context, trigger, answer = self.text_lengths()
        return 2 * context + trigger, answer
