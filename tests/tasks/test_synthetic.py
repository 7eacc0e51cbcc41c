"""Synthetic tasks: exact layouts, determinism, val/test/train separation, metrics, tokenisation, params."""
from __future__ import annotations

import itertools
import random
import subprocess
import sys

import pytest

import tasks
from model.tokenizers import get_tokenizer
from tasks import TaskError, get_task
from tasks.synthetic import SyntheticTask, split_of
from tasks.synthetic.sudoku import is_solution, units

BYTE = get_tokenizer("byte")
SYNTHETIC = ("sudoku", "kv_retrieval", "kvsort", "rightcopy", "constr", "kvsort_order")

# (task, params, prompt, answer) of the first validation example at data_seed 0: one per task and layout
FIRST_VAL = [
    ("sudoku", {}, "SUDOKU4|P=2400010002004321|A=", "2413314212344321"),
    ("sudoku", {"base": 3, "mask_count": 40, "mask_region": "prefix"},
     "SUDOKU9|P=000000000000000000000000000000000000000071468468532791984263517623157984517894623|A=",
     "836725149149386275275419836791648352352971468468532791984263517623157984517894623"),
    ("kv_retrieval", {"layout": "question_last"},
     "08=581219;06=924023;01=903458;05=590598;03=870792;09=767325;07=049277;00=274201;02=630653;04=875873;Q=05;A=",
     "590598"),
    ("kv_retrieval", {"layout": "question_first"},
     "Q=05;08=581219;06=924023;01=903458;05=590598;03=870792;09=767325;07=049277;00=274201;02=630653;04=875873;A=",
     "590598"),
    ("kvsort", {}, "65:540300,72:146370,71:660319,01:431647,12:898533,23:110135,37:613888|Q=SORT|A=",
     "431647,898533,110135,613888,540300,660319,146370"),
    ("rightcopy", {}, "L=9496871531312080|R=4646256638057964|M=", "4646256638057964"),
    ("constr", {}, "P=4098520394192709|R=08|M=", "9080808080808080"),
    ("kvsort_order", {}, "O=0lusqpmgf61vab8nwdhizoj5ker9t2743cxy;xewp9ulvbz8f6nc0thj4|M=", "0lupf6vb8nwhzje9t4cx"),
    ("kvsort_order", {"n": 5, "keys_only": False, "sep": True},
     "O=63dm7shgyqn1rfz0bl5v942u8kjacxpweoit;9:0,g:8,7:6,1:1,x:3|M=", "7:6,g:8,1:1,9:0,x:3"),
]
# small parameter settings for every task (fast, and finite spaces small enough to make the split checks bite)
SMALL = [
    ("sudoku", {"base": 2, "mask_count": 2}),
    ("sudoku", {"base": 3, "mask_count": 30, "mask_region": "suffix"}),
    ("kv_retrieval", {"k": 3, "vlen": 1, "key_width": 1, "layout": "question_first"}),
    ("kvsort", {"n": 2, "vlen": 1, "key_width": 1}),
    ("rightcopy", {"length": 2}),
    ("constr", {"length": 3}),
    ("kvsort_order", {"n": 2}),
    ("kvsort_order", {"n": 3, "keys_only": False, "sep": True}),
]


def make(name, params=None, tokenizer=BYTE, data_seed=0):
    return get_task(name, params or {}, tokenizer, data_seed)


def take(stream, n):
    return list(itertools.islice(stream, n))


def test_registry_and_metric_declarations():
    assert set(SYNTHETIC) <= set(tasks.task_names())
    for name in SYNTHETIC:
        cls = tasks.task_class(name)
        assert issubclass(cls, SyntheticTask)
        assert cls.Params.model_config["extra"] == "forbid"
        assert cls.primary_metric in cls.unit_metrics
        assert "layout" in cls.Params.model_fields
        ex = make(name).eval_set("val", 1)[0]
        assert set(make(name).score(ex, ex.answer)) == set(cls.unit_metrics)


def test_tasks_import_no_torch():
    code = "import sys, tasks; tasks.task_names(); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name,params,prompt,answer", FIRST_VAL)
def test_exact_first_val_example(name, params, prompt, answer):
    ex = make(name, params).eval_set("val", 1)[0]
    assert ex.prompt == prompt
    assert ex.answer == answer
    assert ex.context + ex.trigger == prompt
    assert ex.prompt_ids() == tuple(BYTE.encode(prompt))
    assert ex.answer_ids == tuple(BYTE.encode(answer))


@pytest.mark.parametrize("name,params", SMALL + [(n, {}) for n in SYNTHETIC])
def test_determinism(name, params):
    a, b = make(name, params), make(name, params)
    assert take(a.train_examples(7), 40) == take(b.train_examples(7), 40)
    assert take(a.train_examples(7), 40) != take(a.train_examples(8), 40)
    # val/test: fixed by the data seed alone, whatever training streams were drawn before, and prefix-stable
    fresh = make(name, params)
    for split in ("val", "test"):
        assert a.eval_set(split, 16) == fresh.eval_set(split, 16)
        assert fresh.eval_set(split, 16)[:5] == make(name, params).eval_set(split, 5)
    assert make(name, params, data_seed=1).eval_set("val", 16) != fresh.eval_set("val", 16)


@pytest.mark.parametrize("name,params", SMALL)
def test_val_test_train_disjoint(name, params):
    task = make(name, params)
    val = {e.meta["key"] for e in task.eval_set("val", 8)}
    test = {e.meta["key"] for e in task.eval_set("test", 8)}
    assert len(val) == len(test) == 8 and not val & test
    train = take(task.train_examples(0), 3000)
    assert not {e.meta["key"] for e in train} & (val | test)
    # the problem key names exactly what the prompt shows: equal keys <=> equal prompts
    assert len({e.meta["key"] for e in train}) == len({e.prompt for e in train})
    # the check can fail: unfiltered draws from these spaces do hit the held-out parts
    rng = random.Random(0)
    raw = [task.draw(rng).key for _ in range(3000)]
    assert any(split_of(task.name, 0, k, task.params.holdout_fraction) != "train" for k in raw)


def test_question_layouts_hold_out_the_same_problems():
    first = make("kv_retrieval", {"layout": "question_first"}).eval_set("val", 20)
    last = make("kv_retrieval", {"layout": "question_last"}).eval_set("val", 20)
    assert [e.meta["key"] for e in first] == [e.meta["key"] for e in last]
    assert [e.answer for e in first] == [e.answer for e in last]
    assert all(f.context.startswith("Q=") and ";Q=" in l.context for f, l in zip(first, last))


def test_too_small_space_fails_with_one_line():
    # 4x4 prefix masks: the pattern generator's boards leave only a few dozen distinct puzzles
    task = make("sudoku", {"base": 2, "mask_count": 8, "mask_region": "prefix"})
    with pytest.raises(TaskError) as err:
        task.eval_set("val", 64)
    msg = str(err.value)
    assert "\n" not in msg and "holdout_fraction" in msg and "sudoku" in msg
    # a larger holdout makes a small held-out set possible
    assert len(make("sudoku", {"mask_count": 8, "mask_region": "prefix", "holdout_fraction": 0.25})
               .eval_set("val", 4)) == 4


@pytest.mark.parametrize("base,region,k", [(2, "random", 8), (2, "prefix", 5), (2, "suffix", 6),
                                           (3, "random", 28), (3, "prefix", 40), (3, "suffix", 1)])
def test_sudoku_boards_valid_and_consistent(base, region, k):
    task = make("sudoku", {"base": base, "mask_region": region, "mask_count": k, "holdout_fraction": 0.25})
    side = base * base
    examples = task.eval_set("val", 4) + task.eval_set("test", 4) + take(task.train_examples(3), 50)
    for ex in examples:
        puzzle, board = ex.meta["puzzle"], ex.answer
        assert ex.context == f"SUDOKU{side}|P={puzzle}|" and ex.trigger == "A="
        assert is_solution(board, puzzle, base)
        holes = [i for i, c in enumerate(puzzle) if c == "0"]
        assert len(holes) == k
        if region == "prefix":
            assert holes == list(range(k))
        if region == "suffix":
            assert holes == list(range(side * side - k, side * side))
        assert all(puzzle[i] == board[i] for i in range(side * side) if i not in holes)


def test_sudoku_units_and_checker():
    assert len(units(2)) == 12 and len(units(3)) == 27
    assert all(len(u) == 4 for u in units(2))
    good = "1234341221434321"
    assert is_solution(good, "0" * 16, 2)
    assert not is_solution(good, "2" + "0" * 15, 2)  # breaks a given
    assert not is_solution("1234123412341234", "0" * 16, 2)  # columns repeat
    assert not is_solution(good[:-1], "0" * 16, 2)


def _corrupt(ch: str) -> str:
    return "0" if ch != "0" else "1"


@pytest.mark.parametrize("name,params", SMALL + [(n, {}) for n in SYNTHETIC])
def test_score_perfect_and_corrupted(name, params):
    task = make(name, params)
    for ex in task.eval_set("val", 4):
        perfect = task.score(ex, ex.answer)
        assert all(v == 1.0 for v in perfect.values()), perfect
        # the answer is read at its fixed width: trailing text is ignored
        assert task.score(ex, ex.answer + "|junk") == perfect
        # corrupt a unit that the primary metric counts (for sudoku: the first hole)
        pos = ex.meta["puzzle"].index("0") if name == "sudoku" else 0
        bad = ex.answer[:pos] + _corrupt(ex.answer[pos]) + ex.answer[pos + 1:]
        scored = task.score(ex, bad)
        assert scored[task.primary_metric] < 1.0 and scored["exact"] == 0.0
        assert all(0.0 <= v <= 1.0 for v in scored.values())
        # a short prediction counts the missing characters as wrong
        assert task.score(ex, ex.answer[:-1])["exact"] == 0.0
        assert task.score(ex, "")[task.primary_metric] == 0.0


def test_sudoku_solve_rate_accepts_another_solution():
    task = make("sudoku")
    board = "1234341221434321"
    # a rectangle in rows 0,1 (one band) and columns 0,2 (two stacks): 1 3 / 3 1 can be swapped
    alt = list(board)
    for i, j in ((0, 2), (4, 6)):
        alt[i], alt[j] = alt[j], alt[i]
    alt = "".join(alt)
    assert alt != board and is_solution(alt, "0" * 16, 2)
    puzzle = "".join("0" if i in (0, 2, 4, 6) else c for i, c in enumerate(board))
    ex = task.example(task.problem(puzzle, board))
    got = task.score(ex, alt)
    assert got == {"cell_acc": 1.0, "hole_acc": 1.0, "solve_rate": 1.0, "exact": 0.0}
    wrong = task.score(ex, "2" + alt[1:])  # breaks a given: no longer a solution
    assert wrong["solve_rate"] == 0.0 and wrong["cell_acc"] < 1.0


def test_sudoku_hole_acc_counts_holes_only():
    task = make("sudoku")
    board = "1234341221434321"
    puzzle = "0000" + board[4:]
    ex = task.example(task.problem(puzzle, board))
    half = "1200" + board[4:]  # two of four holes right (and not a solution)
    assert task.score(ex, half) == {"cell_acc": 14 / 16, "hole_acc": 0.5, "solve_rate": 0.0, "exact": 0.0}


def test_kvsort_metrics():
    task = make("kvsort", {"n": 3, "vlen": 2})
    ex = task.eval_set("val", 1)[0]
    v = ex.answer.split(",")
    swapped = ",".join([v[1], v[0], v[2]])
    got = task.score(ex, swapped)
    if v[0] != v[1]:
        assert got["value_acc"] == pytest.approx(1 / 3) and got["exact"] == 0.0
    # commas are not units: a prediction with wrong separators but right digits keeps char_acc 1
    assert task.score(ex, ex.answer.replace(",", ";"))["char_acc"] == 1.0


def test_kvsort_order_metrics():
    task = make("kvsort_order", {"n": 6})
    ex = task.eval_set("val", 1)[0]
    rev = ex.answer[::-1]
    got = task.score(ex, rev)
    assert got["key_valid"] == 1.0 and got["key_order"] == 0.0 and got["exact"] == 0.0
    dup = ex.answer[0] * 6
    assert task.score(ex, dup)["key_valid"] == 0.0
    pairs = make("kvsort_order", {"n": 4, "keys_only": False, "sep": True})
    ex = pairs.eval_set("val", 1)[0]
    items = ex.answer.split(",")
    other_values = ",".join(it[:2] + _corrupt(it[2]) for it in items)
    got = pairs.score(ex, other_values)
    assert got == {"item_acc": 0.0, "key_valid": 1.0, "key_order": 1.0, "exact": 0.0}


def test_constr_and_rightcopy_answers_follow_their_rules():
    for ex in make("constr", {"length": 9}).eval_set("val", 10):
        prefix, pair = ex.context[2:11], ex.context[14:16]
        assert ex.answer == prefix[-1] + (pair * 4)
    for ex in make("rightcopy", {"length": 5}).eval_set("val", 10):
        assert ex.context.split("|R=")[1].rstrip("|") == ex.answer


@pytest.mark.parametrize("name,params", SMALL + [(n, {}) for n in SYNTHETIC])
def test_read_twice_and_max_lengths(name, params):
    task = make(name, params)
    bound_prompt, bound_answer = task.max_lengths()
    for ex in task.eval_set("val", 4) + take(task.train_examples(1), 20):
        assert ex.prompt_ids(read_twice=True) == ex.context_ids + ex.context_ids + ex.trigger_ids
        assert BYTE.decode(list(ex.prompt_ids(read_twice=True))) == ex.context * 2 + ex.trigger
        # the byte tokenizer's bound is exact for every example (fixed-format texts)
        assert (len(ex.prompt_ids(read_twice=True)), len(ex.answer_ids)) == (bound_prompt, bound_answer)


def test_world_tokenizer():
    world = get_tokenizer("world")
    merged = 0
    for name in SYNTHETIC:
        task = make(name, tokenizer=world)
        bound_prompt, bound_answer = task.max_lengths()
        for ex in task.eval_set("val", 4):
            assert world.decode(list(ex.context_ids)) == ex.context
            assert world.decode(list(ex.trigger_ids)) == ex.trigger
            assert world.decode(list(ex.answer_ids)) == ex.answer
            assert ex.prompt_ids(True) == ex.context_ids * 2 + ex.trigger_ids
            assert len(ex.prompt_ids(True)) <= bound_prompt and len(ex.answer_ids) <= bound_answer
            merged += len(ex.answer_ids) < len(ex.answer)
        # same problems whichever tokenizer encodes them
        assert [e.prompt for e in task.eval_set("val", 4)] == [e.prompt for e in make(name).eval_set("val", 4)]
    # digit answers merge into multi-character tokens (why the metrics count characters, not tokens)
    assert merged >= 4 * 4
    ex = make("rightcopy", tokenizer=world).eval_set("val", 1)[0]
    assert len(ex.answer_ids) < len(ex.answer)


@pytest.mark.parametrize("name,params,field", [
    ("sudoku", {"bse": 2}, "bse"),
    ("sudoku", {"base": 4}, "base"),
    ("sudoku", {"base": 2, "mask_count": 16}, "mask_count"),
    ("sudoku", {"mask_region": "middle"}, "mask_region"),
    ("kv_retrieval", {"layout": "q_first"}, "layout"),
    ("kv_retrieval", {"k": 40, "key_width": 1}, "key_width"),
    ("kvsort", {"n": 11, "key_width": 1}, "key_width"),
    ("rightcopy", {"length": 0}, "length"),
    ("constr", {"length": 1}, "length"),
    ("kvsort_order", {"n": 37}, "n"),
    ("kvsort_order", {"holdout_fraction": 0.5}, "holdout_fraction"),
    ("kvsort", {"len": 3}, "len"),
])
def test_params_rejected_with_one_line(name, params, field):
    with pytest.raises(TaskError) as err:
        make(name, params)
    msg = str(err.value)
    assert "\n" not in msg and f"params.{field}" in msg and name in msg


def test_eval_split_name_checked():
    with pytest.raises(TaskError, match="unknown eval split"):
        make("rightcopy").eval_set("train", 4)
