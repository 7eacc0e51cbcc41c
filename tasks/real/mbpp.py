"""MBPP long-context code (the original `train_mbpp_longctx_sft.py`), with execution-based metrics.

Rows: `text` (or `prompt`, `description`) = the problem, `code` (or `canonical_solution`, `completion`) = the
solution, `test_list` (or `tests`) = assert statements, optional `test_setup_code`. Splits: train (374 rows in
the `full` config), validation (90), test (500).

Layouts (prompt = context + trigger; the original's inverted `--q_first` naming made explicit):
  question_first  Problem:\\n{problem}\\n\\nTests:\\n{tests}\\n\\nNotes:\\n{notes}  +  \\n\\nPython solution:\\n
  question_last   Notes:\\n{notes}\\n\\nProblem:\\n{problem}\\n\\nTests:\\n{tests}  +  \\n\\nPython solution:\\n
Notes are distractor problems of the same split (`Problem: {text}\\nTests:\\n{tests}`, never the example's own),
each preceded by a blank line, added until the prompt reaches max_prompt_tokens (fill_notes) or absent.
Answer: `\\n{code}`, cut to max_answer_tokens.

Metrics: token accuracy (worker), and from `score()`: `pass_at_1` (every test passes) and `test_pass_frac`, by
running the greedy-decoded solution and then each test in the sandbox (tasks/sandbox.py).
"""
from __future__ import annotations

from typing import Iterator, Literal

from pydantic import Field

from tasks.base import Example, register
from tasks.real.common import RealParams, RealTask, Rows, fill_notes, note_stream
from tasks.sandbox import Limits, SandboxMode, run_tests

TRIGGER = "\n\nPython solution:\n"
MAX_NOTES = 100_000  # no cap besides the token budget (as the original)


class MBPPParams(RealParams):
    dataset: str = "mbpp"
    dataset_config: str | None = "full"
    train_split: str = "train"
    val_split: str = "validation"
    test_split: str | None = "test"
    n_train: int = Field(320, ge=1)
    n_val: int = Field(80, ge=1)
    n_test: int = Field(200, ge=1)
    layout: Literal["question_first", "question_last"] = "question_first"
    max_prompt_tokens: int = Field(4096, ge=16)
    min_prompt_tokens: int = Field(1536, ge=0)
    max_answer_tokens: int = Field(160, ge=1)
    fill_notes: bool = True
    note_pool_size: int = Field(2048, ge=1)
    exec_timeout_s: float = Field(10.0, gt=0)  # wall time per executed solution
    exec_cpu_s: int = Field(5, ge=1)
    exec_memory_mb: int = Field(1024, ge=64)


def _clean(text) -> str:
    return str(text or "").replace("\r", "").strip()


def _first(row: dict, names: tuple[str, ...]):
    for name in names:
        value = row.get(name)
        if value:
            return value
    return None


def problem_parts(row: dict) -> tuple[str, str, list[str], str]:
    """(problem, code, tests, setup) of a row in either MBPP schema (full or sanitized)."""
    problem = _clean(_first(row, ("text", "prompt", "description")))
    code = _clean(_first(row, ("code", "canonical_solution", "completion")))
    tests = _first(row, ("test_list", "tests")) or []
    tests = [_clean(t) for t in ([tests] if isinstance(tests, str) else tests) if _clean(t)]
    return problem, code, tests, _clean(row.get("test_setup_code"))


def note_text(problem: str, tests: list[str]) -> str:
    return f"Problem: {problem}\nTests:\n" + "\n".join(tests)


@register
class MBPP(RealTask):
    name = "mbpp"
    Params = MBPPParams
    TEMPLATE_VERSION = 1
    unit_metrics = ("pass_at_1", "test_pass_frac")
    metric_definitions = {
        "pass_at_1": "share of generated programs that pass every test, run in the sandbox",
        "test_pass_frac": "mean share of an example's tests that its generated program passes",
    }
    description = "MBPP code with distractor notes; solutions executed against the problem's tests"
    key_columns = ("task_id",)

    params: MBPPParams
    # the executor's mode: the run config's `sandbox` (spec defaults.sandbox); "unsafe" drops the namespace boundary
    sandbox_mode: SandboxMode = "enforced"

    def row_key(self, row: dict) -> str:
        return str(row["task_id"])

    def _note_pool(self, role: str, rows: Rows) -> list[str]:
        order = list(rows.indices)
        self.rng(role, "notes").shuffle(order)
        pool = []
        for i in order[: self.params.note_pool_size]:
            problem, _, tests, _ = problem_parts(rows.ds[i])
            if problem and tests:
                pool.append(note_text(problem, tests))
        return pool

    def _examples(self, role: str, rows: Rows) -> Iterator[Example | str]:
        p = self.params
        pool = self._note_pool(role, rows) if p.fill_notes else []
        trigger_len = self.trigger_len(TRIGGER)
        for idx, row in rows:
            problem, code, tests, setup = problem_parts(row)
            if not (problem and code and tests):
                yield "no problem, code or tests"
                continue
            question = f"Problem:\n{problem}\n\nTests:\n" + "\n".join(tests)
            head, tail = ((question + "\n\nNotes:\n", "") if p.layout == "question_first"
                          else ("Notes:\n", "\n\n" + question))
            notes = ("\n\n" + n for n in note_stream(self.rng(role, "ex", idx), pool, note_text(problem, tests)))
            context = fill_notes(self.tok, head, tail, trigger_len, notes, p.max_prompt_tokens,
                                 MAX_NOTES if p.fill_notes else 0, self.encode_note)
            if context is None:
                yield "problem and tests over max_prompt_tokens"
                continue
            yield self.example(context, TRIGGER, "\n" + code, task_id=row.get("task_id"), problem=problem,
                               tests=tests, setup=setup, code=code, layout=p.layout)

    def exec_limits(self) -> Limits:
        p = self.params
        return Limits(wall_s=p.exec_timeout_s, cpu_s=p.exec_cpu_s, memory_mb=p.exec_memory_mb)

    def score(self, example: Example, predicted: str) -> dict[str, float]:
        report = run_tests(predicted, example.meta["tests"], example.meta.get("setup", ""), self.exec_limits(),
                           mode=self.sandbox_mode)
        return {"pass_at_1": report.pass_at_1, "test_pass_frac": report.test_pass_frac}
