"""HotpotQA long-context QA, distractor setting (the original `train_hotpot_longctx_sft.py`).

Rows: `id`, `question`, `answer`, `context` ({title: [...], sentences: [[...]]} or the legacy [[title, [...]]]
list), `supporting_facts`. Splits: train, validation; the test set is the hash-separated other half of the
validation split (test_split: null), since the distractor test split has no answers.

Context = for each paragraph the parts `{title}:` and `{sentences joined by a space}`, all parts joined by a
blank line; newlines inside the data become spaces.
Layouts (prompt = context + trigger):
  question_last   Context:\\n{context}\\n\\nQuestion:\\n{question}  +  \\n\\nAnswer:
  question_first  Question:\\n{question}\\n\\nContext:\\n{context}  +  \\n\\nAnswer:
Too long: the start of the paragraphs is cut (the material farthest from the answer), never the question or the
trigger. min_prompt_tokens keeps only long-context examples. Answer: ` {answer}` (cut to max_answer_tokens).

Metrics: token accuracy, and `em` / `f1` of the first generated line against the answer (SQuAD normalisation:
lower case, no punctuation, no articles, single spaces).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterator, Literal

from pydantic import Field

from tasks.base import Example, register
from tasks.real.common import RealParams, RealTask, Rows, cut_context_start, first_line

TRIGGER = "\n\nAnswer:"


class HotpotParams(RealParams):
    dataset: str = "hotpot_qa"
    dataset_config: str | None = "distractor"
    train_split: str = "train"
    val_split: str = "validation"
    test_split: str | None = None
    n_train: int = Field(2048, ge=1)
    n_val: int = Field(512, ge=1)
    n_test: int = Field(512, ge=1)
    layout: Literal["question_last", "question_first"] = "question_last"
    max_prompt_tokens: int = Field(2048, ge=16)
    min_prompt_tokens: int = Field(1024, ge=0)
    max_answer_tokens: int = Field(24, ge=1)


def _clean(text) -> str:
    return str(text or "").replace("\n", " ").strip()


def paragraphs(context) -> list[tuple[str, list[str]]]:
    if isinstance(context, dict):
        return list(zip(context.get("title") or [], context.get("sentences") or []))
    return [(item[0], item[1]) for item in context or []]


def context_text(context) -> str:
    parts = []
    for title, sentences in paragraphs(context):
        parts.append(f"{_clean(title)}:")
        parts.append(_clean(" ".join(s.strip() for s in sentences)))
    return "\n\n".join(parts)


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_f1(predicted: str, gold: str) -> float:
    p, g = normalize_answer(predicted).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


@register
class Hotpot(RealTask):
    name = "hotpot"
    Params = HotpotParams
    TEMPLATE_VERSION = 1
    unit_metrics = ("em", "f1")
    metric_definitions = {
        "em": "share of first generated lines equal to the answer after SQuAD normalisation",
        "f1": "mean word-overlap F1 of the first generated line against the answer (SQuAD normalisation)",
    }
    description = "HotpotQA distractor setting: long context, question before or after it"
    key_columns = ("id",)

    params: HotpotParams

    def row_key(self, row: dict) -> str:
        return str(row["id"])

    def _examples(self, role: str, rows: Rows) -> Iterator[Example | str]:
        p = self.params
        trigger_len = self.trigger_len(TRIGGER)
        for _, row in rows:
            question, answer = _clean(row.get("question")), _clean(row.get("answer"))
            if not question or not answer:
                yield "no question or answer"
                continue
            ctx = context_text(row.get("context"))
            if p.layout == "question_last":
                head, tail = "Context:\n", f"\n\nQuestion:\n{question}"
            else:
                head, tail = f"Question:\n{question}\n\nContext:\n", ""
            fitted = cut_context_start(self.tok, head, ctx, tail, trigger_len, p.max_prompt_tokens)
            if fitted is None:
                yield "question over max_prompt_tokens"
                continue
            support = (row.get("supporting_facts") or {}).get("title") or []
            yield self.example(fitted, TRIGGER, " " + answer, id=row.get("id"), gold=answer, layout=p.layout,
                               context_cut=fitted.was_cut,
                               support_kept=all(f"{_clean(t)}:" in fitted.text for t in set(support)))

    def score(self, example: Example, predicted: str) -> dict[str, float]:
        pred, gold = first_line(predicted), example.meta["gold"]
        return {"em": float(normalize_answer(pred) == normalize_answer(gold)), "f1": answer_f1(pred, gold)}
