"""ARC multiple choice, ARC-Challenge by default (the original `train_arc_mc_sft.py`).

Rows: `id`, `question` (a string with `choices` {label: [...], text: [...]}, or {stem, choices: [{label, text}]}),
`answerKey`. Splits: train (1119), validation (299), test (1172).

Choices are sorted by label and written `{label}. {text}`, one per line.
Layouts (prompt = context + trigger; note the trailing space of the trigger):
  options_first   Options:\\n{choices}\\n\\nQuestion:\\n{question}  +  \\n\\nAnswer:_
  question_first  Question:\\n{question}\\n\\nOptions:\\n{choices}  +  \\n\\nAnswer:_
Nothing in an ARC prompt is filler, so an example over max_prompt_tokens is dropped, never cut.
Answer: the first character of `answerKey` (A-E or 1-5), one token.

Metric: token accuracy (= label accuracy on the one answer token) and `label_acc` of the first non-space
generated character.
"""
from __future__ import annotations

from typing import Iterator, Literal

from pydantic import Field

from tasks.base import Example, register
from tasks.real.common import RealParams, RealTask, Rows

TRIGGER = "\n\nAnswer: "


class ARCParams(RealParams):
    dataset: str = "ai2_arc"
    dataset_config: str | None = "ARC-Challenge"
    train_split: str = "train"
    val_split: str = "validation"
    test_split: str | None = "test"
    n_train: int = Field(1000, ge=1)
    n_val: int = Field(200, ge=1)
    n_test: int = Field(200, ge=1)
    layout: Literal["options_first", "question_first"] = "options_first"
    max_prompt_tokens: int = Field(512, ge=16)
    min_prompt_tokens: int = Field(0, ge=0)
    max_answer_tokens: int = Field(8, ge=1)


def question_and_choices(row: dict) -> tuple[str, list[tuple[str, str]]]:
    q = row.get("question")
    if isinstance(q, dict):  # {stem, choices: [{label, text}]}
        stem, raw = q.get("stem", ""), q.get("choices") or []
        choices = [(str(c["label"]), str(c["text"])) for c in raw]
    else:
        stem, raw = q or "", row.get("choices") or {}
        if isinstance(raw, dict):
            choices = list(zip((str(x) for x in raw.get("label", [])), (str(x) for x in raw.get("text", []))))
        else:
            choices = [(str(c["label"]), str(c["text"])) for c in raw]
    return str(stem).strip(), sorted((lab.strip(), txt.strip()) for lab, txt in choices)


@register
class ARC(RealTask):
    name = "arc"
    Params = ARCParams
    TEMPLATE_VERSION = 1
    unit_metrics = ("label_acc",)
    description = "ARC multiple choice: options before or after the question"
    metric_definitions = {
        "label_acc": "share of examples whose first generated non-space character is the answer's label",
    }
    key_columns = ("id",)

    params: ARCParams

    def row_key(self, row: dict) -> str:
        return str(row["id"])

    def _examples(self, role: str, rows: Rows) -> Iterator[Example | str]:
        p = self.params
        for _, row in rows:
            question, choices = question_and_choices(row)
            key = str(row.get("answerKey") or "").strip()[:1]
            if not question or not choices or key not in {lab for lab, _ in choices}:
                yield "no question, choices or valid answer key"
                continue
            options = "\n".join(f"{lab}. {txt}" for lab, txt in choices)
            if p.layout == "options_first":
                context = f"Options:\n{options}\n\nQuestion:\n{question}"
            else:
                context = f"Question:\n{question}\n\nOptions:\n{options}"
            yield self.example(context, TRIGGER, key, id=row.get("id"), label=key, layout=p.layout)

    def score(self, example: Example, predicted: str) -> dict[str, float]:
        pred = predicted.strip()[:1]
        return {"label_acc": float(pred == example.meta["label"])}
