"""ARC (Challenge schema): layouts, label handling, label accuracy."""
from __future__ import annotations

from pathlib import Path

import pytest

from model.tokenizers import get_tokenizer
from tasks import TaskError, get_task
from tasks.real.arc import question_and_choices

FIXTURES = Path(__file__).parent / "fixtures"
TOK = get_tokenizer("world")
BASE = {"dataset": str(FIXTURES / "ai2_arc"), "n_train": 8, "n_val": 4, "n_test": 4}
QUESTION = "Why does the Moon appear to change shape during a month?"
OPTIONS = ("1. clouds cover parts of it\n2. its orbit changes how much of its lit side we see\n"
           "3. it shrinks and grows\n4. Earth's shadow always covers it")


pytestmark = pytest.mark.usefixtures("offline_hf")


def arc(**kw):
    return get_task("arc", {**BASE, **kw}, TOK, 0)


@pytest.mark.parametrize("layout, expected", [
    ("options_first", f"Options:\n{OPTIONS}\n\nQuestion:\n{QUESTION}\n\nAnswer: "),
    ("question_first", f"Question:\n{QUESTION}\n\nOptions:\n{OPTIONS}\n\nAnswer: "),
])
def test_exact_prompt_per_layout(layout, expected, example_with):
    ex = example_with(arc(layout=layout).eval_set("val", 4), id="Mercury_SC_400108")
    assert ex.prompt == expected and ex.trigger == "\n\nAnswer: "
    assert ex.answer == "2" and len(ex.answer_ids) == 1


def test_choices_sorted_by_label_in_both_schemas(example_with):
    row = {"question": "Q?", "choices": {"label": ["D", "C", "B", "A"], "text": ["d", "c", "b", "a"]}}
    assert question_and_choices(row) == ("Q?", [("A", "a"), ("B", "b"), ("C", "c"), ("D", "d")])
    nested = {"question": {"stem": "Q?", "choices": [{"label": "B", "text": "b"}, {"label": "A", "text": "a"}]}}
    assert question_and_choices(nested) == ("Q?", [("A", "a"), ("B", "b")])
    pool = arc().eval_set("test", 4) + arc()._pool("train", 8)
    ex = example_with(pool, id="Mercury_SC_400100")  # stored as D, C, B, A
    assert "Options:\nA. heat energy\nB. elastic potential energy\nC. sound energy\nD. light energy\n" in ex.prompt


def test_every_answer_is_one_label_token():
    task = arc()
    for ex in task._pool("train", 8) + task.eval_set("val", 4) + task.eval_set("test", 4):
        assert len(ex.answer_ids) == 1 and ex.answer in "ABCDE12345" and f"\n{ex.answer}. " in "\n" + ex.context


def test_over_long_prompts_are_dropped_not_cut():
    with pytest.raises(TaskError, match=r"dropped: prompt over max_prompt_tokens"):
        arc(max_prompt_tokens=30).eval_set("val", 4)


def test_label_accuracy(example_with):
    task = arc()
    ex = example_with(task.eval_set("val", 4), id="Mercury_SC_400108")
    assert task.score(ex, "2") == {"label_acc": 1.0}
    assert task.score(ex, " 2. its orbit") == {"label_acc": 1.0}
    assert task.score(ex, "B") == {"label_acc": 0.0}
    assert task.score(ex, "") == {"label_acc": 0.0}
