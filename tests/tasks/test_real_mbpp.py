"""MBPP: layouts, notes, truncation, and executed-test metrics, from the offline fixture (real mbpp/full schema)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from model.tokenizers import get_tokenizer
from tasks import TaskError, get_task

FIXTURES = Path(__file__).parent / "fixtures"
TOK = get_tokenizer("world")
BASE = {"dataset": str(FIXTURES / "mbpp"), "n_train": 10, "n_val": 5, "n_test": 5, "min_prompt_tokens": 0}
PROBLEM_612 = ("Problem:\nWrite a function to count the words of a sentence that are longer than n characters.\n\n"
               "Tests:\nassert count_long_words('the quick brown fox', 3) == 2\nassert count_long_words('', 1) == 0\n"
               "assert count_long_words('aaaa bb', 1) == 2")


pytestmark = pytest.mark.usefixtures("offline_hf")


def mbpp(**kw):
    return get_task("mbpp", {**BASE, **kw}, TOK, 0)


@pytest.mark.parametrize("layout, expected", [
    ("question_first", PROBLEM_612 + "\n\nNotes:\n" + "\n\nPython solution:\n"),
    ("question_last", "Notes:\n" + "\n\n" + PROBLEM_612 + "\n\nPython solution:\n"),
])
def test_exact_prompt_per_layout(layout, expected, example_with):
    ex = example_with(mbpp(layout=layout, fill_notes=False).eval_set("val", 5), task_id=612)
    assert ex.prompt == expected
    assert ex.trigger == "\n\nPython solution:\n" and ex.context + ex.trigger == expected
    assert ex.answer == "\ndef count_long_words(s, n):\n    return sum(1 for w in s.split() if len(w) > n)"


@pytest.mark.parametrize("layout", ["question_first", "question_last"])
def test_notes_fill_to_the_budget_around_an_intact_problem(layout):
    task = mbpp(layout=layout, max_prompt_tokens=600)
    for role, examples in [("train", task._pool("train", 10)), ("val", task.eval_set("val", 5)),
                           ("test", task.eval_set("test", 5))]:
        for ex in examples:
            n = len(ex.prompt_ids())
            assert 590 <= n <= 600, (role, n)
            assert ex.prompt.endswith("\n\nPython solution:\n")
            own_tests = "\n".join(ex.meta["tests"])
            question = f"Problem:\n{ex.meta['problem']}\n\nTests:\n{own_tests}"
            if layout == "question_first":
                assert ex.context.startswith(question + "\n\nNotes:\n")
            else:
                assert ex.context.startswith("Notes:\n") and ex.context.endswith("\n\n" + question)
            assert ex.context.count(own_tests) == 1  # never its own note
            assert ex.context.count("\n\nProblem: ") >= 2  # distractor notes


def test_val_and_test_come_from_their_own_splits():
    task = mbpp(fill_notes=False)
    assert {e.meta["task_id"] for e in task._pool("train", 10)} == set(range(601, 611))
    assert {e.meta["task_id"] for e in task.eval_set("val", 5)} == set(range(611, 616))
    assert {e.meta["task_id"] for e in task.eval_set("test", 5)} == set(range(616, 621))


def test_truncation_keeps_the_problem_and_drops_what_cannot_fit(example_with):
    for layout in ("question_first", "question_last"):
        ex = example_with(mbpp(layout=layout, max_prompt_tokens=110).eval_set("val", 5), task_id=612)
        assert PROBLEM_612 in ex.prompt and len(ex.prompt_ids()) <= 110
    task = mbpp(max_prompt_tokens=40)  # no problem of the fixture fits in 40 tokens with its tests
    with pytest.raises(TaskError, match=r"gives 0 usable examples from 5 rows \(5 dropped: problem and tests over "
                                        r"max_prompt_tokens\); n_val=5 requested"):
        task.eval_set("val", 5)


def test_answer_is_cut_to_max_answer_tokens(example_with):
    ex = example_with(mbpp(fill_notes=False, max_answer_tokens=5).eval_set("val", 5), task_id=612)
    assert len(ex.answer_ids) == 5 and ex.meta["answer_truncated"] and ex.meta["code"].startswith(ex.answer[1:])


def test_executed_metrics(example_with):
    task = mbpp(fill_notes=False, exec_timeout_s=1.0, exec_cpu_s=1)
    val, test = task.eval_set("val", 5), task.eval_set("test", 5)
    for ex in val + test:  # every reference solution passes its tests (task 620 needs its setup code)
        assert task.score(ex, ex.answer) == {"pass_at_1": 1.0, "test_pass_frac": 1.0}, ex.meta["task_id"]
    ex = example_with(val, task_id=612)
    assert task.score(ex, "\ndef count_long_words(s, n):\n    return 2\n") == {"pass_at_1": 0.0,
                                                                             "test_pass_frac": pytest.approx(2 / 3)}
    assert task.score(ex, "\nthis is not python at all (") == {"pass_at_1": 0.0, "test_pass_frac": 0.0}
    assert task.score(ex, "") == {"pass_at_1": 0.0, "test_pass_frac": 0.0}
    t0 = time.monotonic()
    assert task.score(ex, "\nwhile True:\n    pass\n") == {"pass_at_1": 0.0, "test_pass_frac": 0.0}
    assert time.monotonic() - t0 < 5
    # generation that ran on past the solution still counts
    assert task.score(ex, ex.answer + "\n\nProblem: Write a")["pass_at_1"] == 1.0
    box = example_with(test, task_id=620)
    assert box.meta["setup"].startswith("class Box")
    assert task.score(box, "\ndef box_area(box):\n    return box.width * 4\n")["test_pass_frac"] == pytest.approx(2 / 3)
