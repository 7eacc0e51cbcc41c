"""Punctuation restoration: layouts, candidate lines, notes that never leak the target, character accuracy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.tokenizers import get_tokenizer
from tasks import TaskError, get_task
from tasks.real.punc import corrupt, is_candidate, levenshtein

FIXTURES = Path(__file__).parent / "fixtures"
TOK = get_tokenizer("world")
L1 = 'The harbour wall, built in 1843, was "rebuilt" twice; once after a storm.'
N1 = "the harbour wall built in 1843 was rebuilt twice once after a storm"
L2 = "Why did Ada Lorne (the mayor) close the old tram line in May?"
N2 = "why did ada lorne the mayor close the old tram line in may"


pytestmark = pytest.mark.usefixtures("offline_hf")


def text_dataset(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return folder


def test_corruption_and_candidates():
    assert corrupt(L1) == N1 and corrupt(L2) == N2
    assert is_candidate(L1, 20, 220) and not is_candidate(L1, 100, 220) and not is_candidate(L1, 20, 50)
    assert not is_candidate("no punctuation here at all, just" .replace(",", ""), 10, 220)
    assert not is_candidate("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15.", 10, 220)  # too few letters


@pytest.mark.parametrize("layout", ["question_last", "question_first"])
def test_exact_prompt_per_layout(tmp_path, layout):
    data = text_dataset(tmp_path / "two", [" = Heading = ", L1, "", L2, "no punctuation in this line at all"])
    task = get_task("punc_restore", {"dataset": str(data), "layout": layout, "min_chars": 20, "note_pool_size": 1,
                                     "fill_notes": False, "n_train": 1, "n_val": 1, "n_test": 1,
                                     "min_prompt_tokens": 0}, TOK, 0)
    (ex,) = task.eval_set("val", 1)
    clean, note, noisy = (L1, L2, N1) if ex.meta["clean"] == L1 else (L2, L1, N2)
    question = f"Noisy transcript:\n{noisy}\n\nTask: Restore punctuation and casing."
    if layout == "question_last":
        expected = f"Background notes:\n{note}\n\n\n{question}\nAnswer:"
    else:
        expected = f"{question}\n\nBackground notes:\n{note}\n\nAnswer:"
    assert ex.prompt == expected and ex.trigger == "\nAnswer:" and ex.answer == " " + clean
    with pytest.raises(TaskError, match=r"gives 1 usable examples from 5 rows \(3 dropped: no new candidate line; 1 "
                                        r"dropped: line kept for the note pool\); n_val=2 requested"):
        task.eval_set("val", 2)


@pytest.mark.parametrize("layout", ["question_last", "question_first"])
def test_no_target_sentence_appears_in_its_own_prompt(layout):
    params = {"dataset": str(FIXTURES / "wikitext"), "layout": layout, "note_pool_size": 12, "n_train": 20,
              "n_val": 10, "n_test": 10, "max_prompt_tokens": 700, "min_prompt_tokens": 600}
    task = get_task("punc_restore", params, TOK, 0)
    built = task._pool("train", 20) + task.eval_set("val", 10) + task.eval_set("test", 10)
    assert len(built) == 40
    for ex in built:
        assert ex.meta["clean"] not in ex.prompt and ex.answer == " " + ex.meta["clean"]
        assert 600 <= len(ex.prompt_ids()) <= 700
        assert ex.meta["noisy"] in ex.prompt and ex.prompt.count("Background notes:\n") == 1
        assert ex.context.count("\n") >= 10  # filled with many notes


def test_a_note_containing_the_target_is_never_drawn_for_it(tmp_path):
    inner = "Hello, said the keeper of the harbour wall to the visitors."
    outer = "Then: Hello, said the keeper of the harbour wall to the visitors. And he left."
    fillers = [f"Filler line number {k}, about the {k}th tram of the winter market." for k in range(6)]
    data = text_dataset(tmp_path / "nested", [inner, outer, *fillers])
    params = {"dataset": str(data), "min_chars": 20, "note_pool_size": 7, "n_train": 1, "n_val": 1, "n_test": 1,
              "max_prompt_tokens": 400, "min_prompt_tokens": 0}
    for seed in range(40):  # find a data seed for which the contained line is the one target
        (ex,) = get_task("punc_restore", params, TOK, seed).eval_set("val", 1)
        if ex.meta["clean"] == inner:
            break
    else:
        pytest.fail("no data seed made the inner line the target")
    assert inner not in ex.prompt and outer not in ex.prompt
    assert ex.prompt.count("Filler line number") >= 6  # the other notes are drawn, and repeatedly


def test_text_from_hotpot_rows_question_and_answer():
    params = {"dataset": str(FIXTURES / "hotpot_qa"), "dataset_config": "distractor", "test_split": None,
              "note_pool_size": 2, "n_train": 2, "n_val": 2, "n_test": 2, "max_prompt_tokens": 300,
              "min_prompt_tokens": 0}
    task = get_task("punc_restore", params, TOK, 0)
    for ex in task.eval_set("val", 2) + task.eval_set("test", 2):
        assert ex.meta["clean"].startswith("In what year was the largest town on the ")
        assert ex.meta["clean"].split("? ")[1].isdigit()  # "question answer"


def test_character_accuracy():
    task = get_task("punc_restore", {"dataset": str(FIXTURES / "wikitext")}, TOK, 0)
    from tasks.base import Example

    ex = Example("", "\nAnswer:", " " + L2, (), (), (), {"clean": L2})
    assert task.score(ex, " " + L2 + "\nmore") == {"char_acc": 1.0, "exact": 1.0}
    assert task.score(ex, " " + L2.replace("?", "")) == {"char_acc": pytest.approx(1 - 1 / len(L2)), "exact": 0.0}
    assert task.score(ex, "")["char_acc"] == 0.0
    assert levenshtein("kitten", "sitting") == 3
