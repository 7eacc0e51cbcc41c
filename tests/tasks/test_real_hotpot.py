"""HotpotQA (distractor): layouts, context truncation that never touches the question, EM/F1."""
from __future__ import annotations

from pathlib import Path

import pytest

from model.tokenizers import get_tokenizer
from tasks import TaskError, get_task
from tasks.real.hotpot import answer_f1, context_text, normalize_answer

FIXTURES = Path(__file__).parent / "fixtures"
TOK = get_tokenizer("world")
BASE = {"dataset": str(FIXTURES / "hotpot_qa"), "n_train": 8, "n_val": 4, "n_test": 4, "min_prompt_tokens": 0}
ID = "5a0000675542994c784ddaa0"
QUESTION = "In what year was the largest town on the Pellwyn River founded?"
CONTEXT = ("Quillmere:\n\nQuillmere is known for its wool trade. Its old bridge was rebuilt twice.\n\n"
           "Lorvath:\n\nLorvath is a fishing village. It lies far from the Tiveth River.\n\n"
           "Marrowick:\n\nMarrowick is a market town on the Pellwyn River. It was founded in 1613 by Lady Maren Holt. "
           "Its population was about 5000 at the last census.\n\n"
           "Pellwyn River:\n\nThe Pellwyn River rises in the northern hills. "
           "The largest town on its banks is Marrowick.")


pytestmark = pytest.mark.usefixtures("offline_hf")


def hotpot(**kw):
    return get_task("hotpot", {**BASE, **kw}, TOK, 0)


@pytest.mark.parametrize("layout, expected", [
    ("question_last", f"Context:\n{CONTEXT}\n\nQuestion:\n{QUESTION}\n\nAnswer:"),
    ("question_first", f"Question:\n{QUESTION}\n\nContext:\n{CONTEXT}\n\nAnswer:"),
])
def test_exact_prompt_per_layout(layout, expected, example_with):
    ex = example_with(hotpot(layout=layout).eval_set("val", 4), id=ID)
    assert ex.prompt == expected and ex.trigger == "\n\nAnswer:"
    assert ex.answer == " 1613" and not ex.meta["context_cut"] and ex.meta["support_kept"]


def test_context_formatting_of_both_schemas():
    legacy = [["A", ["One.", " Two."]], ["B", ["Three."]]]
    modern = {"title": ["A", "B"], "sentences": [["One.", " Two."], ["Three."]]}
    assert context_text(legacy) == context_text(modern) == "A:\n\nOne. Two.\n\nB:\n\nThree."


@pytest.mark.parametrize("layout", ["question_last", "question_first"])
def test_truncation_cuts_the_context_start_and_keeps_the_question(layout, example_with):
    full = example_with(hotpot(layout=layout).eval_set("val", 4), id=ID)
    task = hotpot(layout=layout, max_prompt_tokens=60)
    examples = task._pool("train", 8) + task.eval_set("val", 4) + task.eval_set("test", 4)
    for ex in examples:
        assert len(ex.prompt_ids()) <= 60 and ex.meta["context_cut"]
        assert ex.prompt.endswith("\n\nAnswer:")
        assert ex.context.count("Question:\n") == 1
    ex = example_with(examples, id=ID)
    q = f"Question:\n{QUESTION}"
    if layout == "question_last":
        assert ex.context.startswith("Context:\n") and ex.context.endswith("\n\n" + q)
        kept = ex.context[len("Context:\n"):-len("\n\n" + q)]
    else:
        assert ex.context.startswith(q + "\n\nContext:\n")
        kept = ex.context[len(q + "\n\nContext:\n"):]
    assert CONTEXT.endswith(kept) and len(kept) < len(CONTEXT)  # the start went, the end stayed
    assert full.context.endswith(kept + ("\n\n" + q if layout == "question_last" else ""))


def test_min_prompt_tokens_keeps_long_contexts_only():
    lengths = sorted(len(e.prompt_ids()) for e in hotpot(n_val=8).eval_set("val", 8))  # the whole val part
    floor = lengths[4]
    long_enough = sum(n >= floor for n in lengths)
    task = hotpot(min_prompt_tokens=floor, n_val=1)
    assert all(len(e.prompt_ids()) >= floor for e in task.eval_set("val", long_enough))
    with pytest.raises(TaskError, match=rf"gives {long_enough} usable examples from 8 rows \({8 - long_enough} "
                                        r"dropped: prompt under min_prompt_tokens\); "
                                        rf"n_val={long_enough + 1} requested"):
        hotpot(min_prompt_tokens=floor, n_val=1).eval_set("val", long_enough + 1)


def test_question_that_cannot_fit_is_dropped_not_cut():
    with pytest.raises(TaskError, match=r"dropped: question over max_prompt_tokens"):
        hotpot(max_prompt_tokens=16).eval_set("val", 1)


def test_em_and_f1(example_with):
    ex = example_with(hotpot().eval_set("val", 4), id=ID)
    task = hotpot()
    assert task.score(ex, " 1613\nQuestion: more text") == {"em": 1.0, "f1": 1.0}
    assert task.score(ex, " in 1613") == {"em": 0.0, "f1": pytest.approx(2 / 3)}
    assert task.score(ex, " 1614") == {"em": 0.0, "f1": 0.0}
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert answer_f1("a cat sat", "the cat sat down") == pytest.approx(0.8)
