"""The main branch's infill tasks (docs/original.md), recast as prompt -> answer tasks.

On the main branch a string like `L=...|M=...|R=...` was filled in place: the span M was masked and a causal
scan had to predict it before reading R. Without Future-Seed the scan had no access to R at all, so "FS off vs
on" was partly "no access vs access". Here the worker trains prompt -> answer, so the known parts, in their
original left-to-right order, form the context and the masked span is the answer, introduced by the trigger `M=`.
Everything the answer needs is in the prompt, so a baseline can solve these tasks too; the question Future-Seed
answers here is one of reading order: whether deeper layers that start from a summary of the whole prompt read the
early parts better. The matched no-FS control is `read_twice` (context, context, trigger): a second reading in
which the whole prompt has been seen once already.
"""
from __future__ import annotations

import math
import random
from typing import Literal

from pydantic import Field

from tasks.base import Example, register
from tasks.synthetic.common import (BASE36, CHAR_AND_EXACT_DEFINITIONS, DIGITS, Problem, SyntheticParams, SyntheticTask,
                                    char_and_exact, digit_chance_levels, fixed_width, random_digits)

DEFAULT_LENGTH = 16  # span length of the main branch's headline runs


class RightCopyParams(SyntheticParams):
    layout: Literal["left_right"] = "left_right"
    length: int = Field(DEFAULT_LENGTH, ge=1)  # digits in L, in R, and in the answer


@register
class RightCopyTask(SyntheticTask):
    """Copy the right part (main branch RIGHTCOPY, `L={n digits}|M={copy of R}|R={n digits}`).

    Layout `left_right`: context `L={L}|R={R}|`, trigger `M=`, answer R. L is random digits the answer does not
    use. Metrics: `char_acc`, `exact`.
    """

    name = "rightcopy"
    Params = RightCopyParams
    primary_metric = "char_acc"
    unit_metrics = ("char_acc", "exact")
    description = "copy the right-hand digit string past a distractor"
    metric_definitions = CHAR_AND_EXACT_DEFINITIONS

    @classmethod
    def chance_levels(cls, params: RightCopyParams) -> dict[str, float]:
        return digit_chance_levels(params.length)

    params: RightCopyParams

    def draw(self, rng: random.Random) -> Problem:
        n = self.params.length
        left, right = random_digits(rng, n), random_digits(rng, n)
        return Problem(key=f"{left}|{right}", context=f"L={left}|R={right}|", trigger="M=", answer=right)

    def text_lengths(self) -> tuple[int, int, int]:
        n = self.params.length
        return 2 * n + len("L=|R=|"), len("M="), n

    def score(self, example: Example, predicted: str) -> dict[str, float]:
        return char_and_exact(predicted, example.answer)


class ConstrParams(SyntheticParams):
    layout: Literal["prefix_right"] = "prefix_right"
    length: int = Field(DEFAULT_LENGTH, ge=2)  # digits in P and in the answer


@register
class ConstrTask(SyntheticTask):
    """A span constrained from both sides (main branch CONSTR,
    `P={n digits}|M={last digit of P}{d1 d2 d1 d2 ..., n-1}|R={d1}{d2}`).

    Layout `prefix_right`: context `P={P}|R={d1}{d2}|`, trigger `M=`, answer the last digit of P followed by
    d1 d2 d1 d2 ... (n-1 digits). d1 and d2 are independent random digits (they may be equal). The first answer
    digit needs the left part, the rest need the right part. Metrics: `char_acc`, `exact`.
    """

    name = "constr"
    Params = ConstrParams
    primary_metric = "char_acc"
    unit_metrics = ("char_acc", "exact")
    description = "span fixed by the prefix's last digit and a right-hand alternating pattern"
    metric_definitions = CHAR_AND_EXACT_DEFINITIONS

    @classmethod
    def chance_levels(cls, params: ConstrParams) -> dict[str, float]:
        return digit_chance_levels(params.length)

    params: ConstrParams

    def draw(self, rng: random.Random) -> Problem:
        n = self.params.length
        prefix, pair = random_digits(rng, n), random_digits(rng, 2)
        answer = prefix[-1] + "".join(pair[i % 2] for i in range(n - 1))
        return Problem(key=f"{prefix}|{pair}", context=f"P={prefix}|R={pair}|", trigger="M=", answer=answer)

    def text_lengths(self) -> tuple[int, int, int]:
        n = self.params.length
        return n + 2 + len("P=|R=|"), len("M="), n

    def score(self, example: Example, predicted: str) -> dict[str, float]:
        return char_and_exact(predicted, example.answer)


class KVSortOrderParams(SyntheticParams):
    layout: Literal["order_items"] = "order_items"
    n: int = Field(20, ge=1, le=len(BASE36))  # items (distinct keys from the 36 base-36 characters)
    keys_only: bool = True  # items are bare keys; False: items are `k:v` with a one-digit value
    sep: bool = False  # items joined by ','; False: concatenated


@register
class KVSortOrderTask(SyntheticTask):
    """Sort items by a rank given in the prompt (main branch KVSORT, `P=...|M={sorted}|R=O={order};{items}`).

    Layout `order_items`: context `O={order};{items}|`, trigger `M=`, answer the items sorted by the position of
    their key in `order`. `order` is a random permutation of the 36 characters 0-9a-z; the n keys are distinct
    characters in random order. An item is the key alone (keys_only) or `k:v` with a random digit v; items are
    joined by ',' (sep) or concatenated. Defaults follow the main branch's headline (n=20, keys only, no separator).

    Metrics: `item_acc` (items in the right slot), `key_valid` (the predicted keys are a permutation of the given
    keys), `key_order` (the keys are in the right order, values ignored), `exact`.
    """

    name = "kvsort_order"
    Params = KVSortOrderParams
    primary_metric = "item_acc"
    unit_metrics = ("item_acc", "key_valid", "key_order", "exact")
    description = "items sorted by the rank their keys have in a given order string"
    metric_definitions = {
        "item_acc": "share of the n answer slots holding the right item",
        "key_valid": "share of predictions whose keys are a permutation of the given keys",
        "key_order": "share of predictions whose keys are in the right order (values ignored)",
        "exact": "share of predictions equal to the answer",
    }

    @classmethod
    def chance_levels(cls, params: KVSortOrderParams) -> dict[str, float]:
        """The given items in a uniformly random order: each slot right with probability 1/n."""
        orders = math.factorial(params.n)
        return {"item_acc": 1.0 / params.n, "key_order": 1.0 / orders, "exact": 1.0 / orders}

    params: KVSortOrderParams

    @property
    def item_width(self) -> int:
        return 1 if self.params.keys_only else 3

    @property
    def joiner(self) -> str:
        return "," if self.params.sep else ""

    def draw(self, rng: random.Random) -> Problem:
        p = self.params
        order = "".join(rng.sample(BASE36, len(BASE36)))
        keys = rng.sample(BASE36, p.n)
        items = keys if p.keys_only else [f"{k}:{rng.choice(DIGITS)}" for k in keys]
        shown = self.joiner.join(items)
        answer = self.joiner.join(sorted(items, key=lambda item: order.index(item[0])))
        return Problem(key=f"{order};{shown}", context=f"O={order};{shown}|", trigger="M=", answer=answer,
                       meta={"keys": "".join(keys)})

    def text_lengths(self) -> tuple[int, int, int]:
        items = self.params.n * self.item_width + (self.params.n - 1) * len(self.joiner)
        return len("O=;|") + len(BASE36) + items, len("M="), items

    def items(self, text: str) -> list[str]:
        """The n items of a fixed-width answer, read by position."""
        stride = self.item_width + len(self.joiner)
        return [text[i * stride: i * stride + self.item_width] for i in range(self.params.n)]

    def score(self, example: Example, predicted: str) -> dict[str, float]:
        pred = fixed_width(predicted, len(example.answer))
        want, got = self.items(example.answer), self.items(pred)
        got_keys, want_keys = [g[0] for g in got], [w[0] for w in want]
        return {"item_acc": sum(g == w for g, w in zip(got, want)) / len(want),
                "key_valid": float(sorted(got_keys) == sorted(example.meta["keys"])),
                "key_order": float(got_keys == want_keys),
                "exact": float(pred == example.answer)}
