"""Punctuation and casing restoration (the original `train_punc_restore_sft.py`), from any text dataset.

Text per row: `text_field` if given, else `text` (newlines to spaces, whitespace collapsed), else the non-empty
fields among question/answer/instruction/prompt/output joined by a space (HotpotQA: "question answer"), else the
first three sentences of each of the first two HotpotQA context paragraphs. A line is a target candidate if its
length is within [min_chars, max_chars], it holds one of .,;:!?"()[]{} and at least max(24, len/3) letters, and
its corrupted form (those characters to spaces, lower case, whitespace collapsed) differs from it.
WikiText-2 (raw) is the default; the rounds of the original that produced results used `hotpot_qa`/`distractor`
(set dataset, dataset_config and test_split: null for that).

Notes vs targets: a role's candidate lines (deduplicated, in the role's shuffled order) are split into the note
pool (the first note_pool_size lines) and the targets (the rest), so a target is never a note; a note that
contains its example's target is never drawn for it. No target sentence appears in its own prompt.

Layouts (prompt = context + trigger; each note is followed by a newline):
  question_last   Background notes:\\n{notes}\\n\\nNoisy transcript:\\n{noisy}\\n\\n{TASK}  +  \\nAnswer:
  question_first  Noisy transcript:\\n{noisy}\\n\\n{TASK}\\n\\nBackground notes:\\n{notes}  +  \\nAnswer:
with TASK = `Task: Restore punctuation and casing.`
fill_notes: random notes until max_prompt_tokens (at most 256); otherwise one random note. Answer: ` {clean}`.

Metrics: token accuracy, and of the first generated line: `char_acc` = 1 - Levenshtein distance / target length
(floored at 0) and `exact`.
"""
from __future__ import annotations

import re
from typing import Iterator, Literal

from pydantic import Field, model_validator

from tasks.base import DataUnavailable, Example, register
from tasks.real.common import RealParams, RealTask, Rows, fill_notes, first_line, note_stream

TRIGGER = "\nAnswer:"
TASK_LINE = "Task: Restore punctuation and casing."
PUNCT = set('.,;:!?"()[]{}')
MAX_NOTE_PICKS = 256
ROW_FIELDS = ("question", "answer", "instruction", "prompt", "output")
MIN_LETTERS = 24


class PuncParams(RealParams):
    dataset: str = "wikitext"
    dataset_config: str | None = "wikitext-2-raw-v1"
    train_split: str = "train"
    val_split: str = "validation"
    test_split: str | None = "test"
    text_field: str | None = None
    n_train: int = Field(1200, ge=1)
    n_val: int = Field(240, ge=1)
    n_test: int = Field(240, ge=1)
    layout: Literal["question_last", "question_first"] = "question_last"
    min_chars: int = Field(64, ge=1)
    max_chars: int = Field(220, ge=1)
    note_pool_size: int = Field(1024, ge=1)
    fill_notes: bool = True
    max_prompt_tokens: int = Field(2048, ge=16)
    min_prompt_tokens: int = Field(768, ge=0)
    max_answer_tokens: int = Field(180, ge=1)

    @model_validator(mode="after")
    def _check_chars(self):
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) exceeds max_chars ({self.max_chars})")
        return self


def _collapse(text) -> str:
    return " ".join(str(text or "").split())


def corrupt(line: str) -> str:
    return " ".join("".join(" " if ch in PUNCT else ch for ch in line).lower().split())


def is_candidate(line: str, min_chars: int, max_chars: int) -> bool:
    if not (min_chars <= len(line) <= max_chars) or not any(ch in PUNCT for ch in line):
        return False
    if sum(ch.isalpha() for ch in line) < max(MIN_LETTERS, len(line) // 3):
        return False
    return corrupt(line) != line


def row_texts(row: dict, text_field: str | None) -> list[str]:
    if text_field is not None:
        return [_collapse(row.get(text_field))]
    if "text" in row:
        return [_collapse(row.get("text"))]
    joined = " ".join(_collapse(row.get(f)) for f in ROW_FIELDS if _collapse(row.get(f)))
    if joined:
        return [joined]
    ctx = row.get("context")
    out = []
    if isinstance(ctx, dict):
        for sentences in (ctx.get("sentences") or [])[:2]:
            out.append(_collapse(" ".join(s.strip() for s in sentences[:3])))
    return out


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@register
class PuncRestore(RealTask):
    name = "punc_restore"
    Params = PuncParams
    TEMPLATE_VERSION = 1
    unit_metrics = ("char_acc", "exact")
    metric_definitions = {
        "char_acc": "mean of 1 - Levenshtein distance / target length (floored at 0), first generated line",
        "exact": "share of first generated lines equal to the clean target line",
    }
    description = "restore punctuation and casing of a noisy line, among background notes"

    params: PuncParams

    def row_key(self, row: dict) -> str:
        return "\n".join(row_texts(row, self.params.text_field))

    def _text_columns(self, ds) -> list[str] | None:
        cols = ds.column_names
        if self.params.text_field is not None:
            if self.params.text_field not in cols:
                return None
            return [self.params.text_field]
        for group in (["text"], [c for c in ROW_FIELDS if c in cols], ["context"]):
            if group and all(c in cols for c in group):
                return group
        return None

    def lines(self, rows: Rows) -> tuple[list[str], int]:
        """The role's candidate lines, deduplicated, in the role's order; and the number of rows giving none."""
        p = self.params
        cols = self._text_columns(rows.ds)
        if cols is None:
            field = p.text_field or "text / question / answer / context"
            raise DataUnavailable(f"{self.name}: dataset {p.dataset!r} has no text column ({field}); set "
                                  "params.text_field")
        ds = rows.ds.select_columns(cols)
        seen, out, barren = set(), [], 0
        for i in rows.indices:
            found = False
            for line in row_texts(ds[i], p.text_field):
                if line not in seen and is_candidate(line, p.min_chars, p.max_chars):
                    seen.add(line)
                    out.append(line)
                    found = True
            barren += not found
        return out, barren

    def _examples(self, role: str, rows: Rows) -> Iterator[Example | str]:
        p = self.params
        lines, barren = self.lines(rows)
        pool, targets = lines[: p.note_pool_size], lines[p.note_pool_size:]
        for _ in range(barren):
            yield "no new candidate line"
        for _ in pool:
            yield "line kept for the note pool"
        trigger_len = self.trigger_len(TRIGGER)
        for k, clean in enumerate(targets):
            noisy = corrupt(clean)
            question = f"Noisy transcript:\n{noisy}\n\n{TASK_LINE}"
            if p.layout == "question_last":
                head, tail = "Background notes:\n", "\n\n" + question
            else:
                head, tail = question + "\n\nBackground notes:\n", ""
            allowed = [n for n in pool if clean not in n]
            notes = (n + "\n" for n in note_stream(self.rng(role, "ex", k), allowed))
            context = fill_notes(self.tok, head, tail, trigger_len, notes, p.max_prompt_tokens,
                                 MAX_NOTE_PICKS if p.fill_notes else 1, self.encode_note)
            if context is None:
                yield "noisy line over max_prompt_tokens"
                continue
            yield self.example(context, TRIGGER, " " + clean, clean=clean, noisy=noisy, layout=p.layout)

    def score(self, example: Example, predicted: str) -> dict[str, float]:
        pred, gold = first_line(predicted), example.meta["clean"]
        return {"char_acc": max(0.0, 1.0 - levenshtein(pred, gold) / max(1, len(gold))), "exact": float(pred == gold)}
