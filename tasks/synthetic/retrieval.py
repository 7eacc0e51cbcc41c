"""Key-value tasks of the original post-training branch's synthetic set (docs/original.md): retrieval and kvsort."""
from __future__ import annotations

import random
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from tasks.base import Example, register
from tasks.synthetic.common import (CHAR_AND_EXACT_DEFINITIONS, Problem, SyntheticParams, SyntheticTask, base36,
                                    char_accuracy, char_and_exact, digit_chance_levels, fixed_width, random_digits)


class KVRetrievalParams(SyntheticParams):
    layout: Literal["question_first", "question_last"] = "question_last"
    k: int = Field(10, ge=1)  # pairs in the document
    vlen: int = Field(6, ge=1)  # digits per value
    key_width: int = Field(2, ge=1)  # base-36 characters per key

    @field_validator("key_width")
    @classmethod
    def _enough_keys(cls, v: int, info: ValidationInfo) -> int:
        k = info.data.get("k", 1)
        if k > 36 ** v:
            raise ValueError(f"{v} base-36 characters give only {36 ** v} keys, fewer than k={k}")
        return v


@register
class KVRetrievalTask(SyntheticTask):
    """Find the value of one key in a document of k pairs (the original's `retrieval`).

    Document `kk=vvvvvv;kk=vvvvvv;...`: keys are 0..k-1 written in base 36 and zero-padded to key_width, in shuffled
    order; values are vlen random digits; the queried key is any of the k.

    Layouts (trigger `A=`, answer the queried value):
    - `question_last`:  context `{doc};Q={key};`, the question comes after the document, so a left-to-right reader
      meets every pair before it knows which one is asked (the case Future-Seed is meant to help);
    - `question_first`: context `Q={key};{doc};`, the question comes before the document, so a reader knows
      what to look for while it reads.
    Both layouts hold out the same problems. Metrics: `char_acc` (value digits), `exact`.
    """

    name = "kv_retrieval"
    Params = KVRetrievalParams
    primary_metric = "char_acc"
    unit_metrics = ("char_acc", "exact")
    description = "value of the queried key in a document of key=value pairs"
    metric_definitions = CHAR_AND_EXACT_DEFINITIONS  # the answer is the queried value

    @classmethod
    def chance_levels(cls, params: KVRetrievalParams) -> dict[str, float]:
        return digit_chance_levels(params.vlen)

    params: KVRetrievalParams

    def draw(self, rng: random.Random) -> Problem:
        p = self.params
        keys = [base36(i, p.key_width) for i in range(p.k)]
        values = [random_digits(rng, p.vlen) for _ in keys]
        order = list(range(p.k))
        rng.shuffle(order)
        doc = ";".join(f"{keys[i]}={values[i]}" for i in order)
        q = rng.randrange(p.k)
        context = f"{doc};Q={keys[q]};" if p.layout == "question_last" else f"Q={keys[q]};{doc};"
        return Problem(key=f"{doc}|{keys[q]}", context=context, trigger="A=", answer=values[q])

    def text_lengths(self) -> tuple[int, int, int]:
        p = self.params
        doc = p.k * (p.key_width + 1 + p.vlen) + (p.k - 1)
        return doc + len(";Q=;") + p.key_width, len("A="), p.vlen

    def score(self, example: Example, predicted: str) -> dict[str, float]:
        return char_and_exact(predicted, example.answer)


class KVSortParams(SyntheticParams):
    layout: Literal["pairs_then_sort"] = "pairs_then_sort"
    n: int = Field(7, ge=1)  # pairs
    vlen: int = Field(6, ge=1)  # digits per value
    key_width: int = Field(2, ge=1)  # decimal digits per key: keys are distinct numbers below 10**key_width

    @field_validator("key_width")
    @classmethod
    def _enough_keys(cls, v: int, info: ValidationInfo) -> int:
        n = info.data.get("n", 1)
        if n > 10 ** v:
            raise ValueError(f"{v} decimal digits give only {10 ** v} keys, fewer than n={n}")
        return v


@register
class KVSortTask(SyntheticTask):
    """List the values in the order of their keys (the original tasks.py `kvsort`, Q->A form).

    Layout `pairs_then_sort`: context `kk:vvvvvv,kk:vvvvvv,...|Q=SORT|` (n distinct zero-padded decimal keys in
    random order, values of vlen random digits), trigger `A=`, answer the values sorted by key, comma-joined.
    Metrics: `char_acc` (value digits; the commas are not counted), `value_acc` (whole values in the right slot),
    `exact`.
    """

    name = "kvsort"
    Params = KVSortParams
    primary_metric = "char_acc"
    unit_metrics = ("char_acc", "value_acc", "exact")
    description = "values of key:value pairs listed in key order"
    metric_definitions = {
        "char_acc": "share of the answer's value digits predicted right, position by position (commas not counted)",
        "value_acc": "share of the n value slots whose every digit is right",
        "exact": "share of predictions equal to the whole answer, commas included",
    }

    @classmethod
    def chance_levels(cls, params: KVSortParams) -> dict[str, float]:
        """Digits guessed uniformly (the commas in place): 1/10 each."""
        return {"char_acc": 0.1, "value_acc": 0.1 ** params.vlen, "exact": 0.1 ** (params.n * params.vlen)}

    params: KVSortParams

    def draw(self, rng: random.Random) -> Problem:
        p = self.params
        keys = rng.sample(range(10 ** p.key_width), p.n)
        values = [random_digits(rng, p.vlen) for _ in keys]
        pairs = ",".join(f"{k:0{p.key_width}d}:{v}" for k, v in zip(keys, values))
        answer = ",".join(v for _, v in sorted(zip(keys, values)))
        return Problem(key=pairs, context=f"{pairs}|Q=SORT|", trigger="A=", answer=answer)

    def text_lengths(self) -> tuple[int, int, int]:
        p = self.params
        pairs = p.n * (p.key_width + 1 + p.vlen) + (p.n - 1)
        return pairs + len("|Q=SORT|"), len("A="), p.n * p.vlen + (p.n - 1)

    def score(self, example: Example, predicted: str) -> dict[str, float]:
        answer, vlen = example.answer, self.params.vlen
        pred = fixed_width(predicted, len(answer))
        slots = [range(i * (vlen + 1), i * (vlen + 1) + vlen) for i in range(self.params.n)]
        digits = [i for slot in slots for i in slot]
        return {"char_acc": char_accuracy(pred, answer, digits),
                "value_acc": sum(all(pred[i] == answer[i] for i in s) for s in slots) / len(slots),
                "exact": float(pred == answer)}
