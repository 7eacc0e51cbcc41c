"""Protein SS spot labelling and contact pairs: layouts, windows, queries, pair sampling, per-residue/per-pair
metrics, from real-schema fixtures."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from model.tokenizers import get_tokenizer
from tasks import TaskError, get_task
from tasks.real.common import HASH_BUCKETS, hash_bucket

FIXTURES = Path(__file__).parent / "fixtures"
TOK = get_tokenizer("world")
SS_FILE = FIXTURES / "protein_ss" / "train.jsonl"
SS_INST = ("Task: Protein secondary-structure spot labeling.\n"
           "Output one symbol per queried residue index (same order).\n")
CONTACT_INST = ("Task: Protein contact QA.\nFor each queried residue pair, output 1 if in contact, else 0.\n"
                "Output bits in the same order, no spaces.\n")


pytestmark = pytest.mark.usefixtures("offline_hf")


def rows(path: Path, key: str) -> dict[str, dict]:
    return {r[key]: r for r in map(json.loads, path.read_text().splitlines())}


SS_ROWS = rows(SS_FILE, "PDB_ID")
CONTACT_ROWS = {**rows(FIXTURES / "protein_contact" / "train.jsonl", "name"),
                **rows(FIXTURES / "protein_contact" / "valid.jsonl", "name"),
                **rows(FIXTURES / "protein_contact" / "test.jsonl", "name")}


def ss(**kw):
    return get_task("protein_ss_spot", {"dataset": str(SS_FILE), "n_train": 4, "n_val": 2, "n_test": 2,
                                        "min_prompt_tokens": 0, **kw}, TOK, 0)


def contact(**kw):
    return get_task("protein_contact_pair", {"dataset": str(FIXTURES / "protein_contact"), "n_train": 4, "n_val": 2,
                                             "n_test": 2, "num_pairs": 8, "min_prompt_tokens": 0, **kw}, TOK, 0)


# ---------------------------------------------------------------------------------------------- secondary structure


@pytest.mark.parametrize("layout", ["question_first", "question_last"])
def test_ss_exact_prompt_per_layout(layout):
    ex = ss(layout=layout, fill_notes=False, max_seq_len=1000, min_seq_len=1, num_queries=5,
            query_region="prefix").eval_set("val", 1)[0]
    row = SS_ROWS[ex.meta["pdb_id"]]
    seq = row["Sequence"]
    q = f"Sequence:\n{seq}\nQueries(1-based): 1,2,3,4,5"
    expected = (f"{SS_INST}\n{q}\nNotes:\n\n\nAnswer:\n" if layout == "question_first"
                else f"{SS_INST}\nNotes:\n\n\n{q}\nAnswer:\n")
    assert ex.prompt == expected and ex.answer == row["Secondary_structure"][:5]


def test_ss_windows_and_queries_match_the_labels():
    for region in ("random", "prefix", "suffix"):
        task = ss(max_seq_len=50, num_queries=12, query_region=region, max_prompt_tokens=700)
        for ex in task._pool("train", 4) + task.eval_set("val", 2):
            row = SS_ROWS[ex.meta["pdb_id"]]
            start, pos = ex.meta["window_start"], ex.meta["positions"]
            window = row["Sequence"][start:start + 50]
            assert f"Sequence:\n{window}\nQueries(1-based): {','.join(str(i + 1) for i in pos)}" in ex.prompt
            assert len(pos) == 12 and pos == sorted(set(pos)) and all(0 <= i < len(window) for i in pos)
            if region == "prefix":
                assert pos == list(range(12))
            if region == "suffix":
                assert pos == list(range(len(window) - 12, len(window)))
            assert ex.answer == "".join(row["Secondary_structure"][start + i] for i in pos)
            assert 690 <= len(ex.prompt_ids()) <= 700 and ex.prompt.count("\n\nProtein note ") >= 3


def test_ss_hash_split_and_dropped_rows():
    task = ss(min_seq_len=200)
    ids = {role: {r["PDB_ID"] for _, r in task.role_rows(role)} for role in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"]) and not (ids["val"] & ids["test"]) and not (ids["train"] & ids["test"])
    bad = "9ZZZ|120|ACDEFGHIKLACDEFG"  # Sequence and Secondary_structure lengths differ
    role = next(r for r, b in HASH_BUCKETS[frozenset({"train", "val", "test"})].items() if hash_bucket(bad) in b)
    count = {"train": "n_train", "val": "n_val", "test": "n_test"}[role]
    with pytest.raises(TaskError) as e:
        task._pool(role, 500)
    msg = str(e.value)
    assert "; 1 dropped: sequence and structure lengths differ" in msg or "(1 dropped: sequence and struct" in msg
    assert " dropped: sequence shorter than min_seq_len" in msg and msg.endswith(f"); {count}=500 requested")
    assert f"({role} part of a hash split)" in msg


def test_ss_residue_accuracy():
    task = ss()
    ex = task.eval_set("val", 1)[0]
    gold = ex.answer
    assert task.score(ex, gold + "\nextra") == {"residue_acc": 1.0, "seq_acc": 1.0}
    wrong_first = ("E" if gold[0] != "E" else "H") + gold[1:]
    assert task.score(ex, wrong_first) == {"residue_acc": pytest.approx(1 - 1 / len(gold)), "seq_acc": 0.0}
    assert task.score(ex, gold[: len(gold) // 2]) == {"residue_acc": pytest.approx((len(gold) // 2) / len(gold)),
                                                      "seq_acc": 0.0}


# ---------------------------------------------------------------------------------------------------------- contact


def bit(row: dict, start: int, i: int, j: int, cutoff: float = 8.0) -> int:
    return int(math.dist(row["tertiary"][start + i], row["tertiary"][start + j]) <= cutoff)


@pytest.mark.parametrize("layout", ["question_first", "question_last"])
def test_contact_exact_prompt_per_layout(layout):
    ex = contact(layout=layout, fill_notes=False).eval_set("val", 1)[0]
    row = CONTACT_ROWS[ex.meta["name"]]
    start = ex.meta["window_start"]
    window = row["seq"][start:start + 384]
    pairs = ",".join(f"{i + 1}-{j + 1}" for i, j in ex.meta["pairs"])
    q = f"Sequence:\n{window}\nPairs(1-based): {pairs}"
    expected = (f"{CONTACT_INST}\n{q}\nNotes:\n\n\nAnswer bits:\n" if layout == "question_first"
                else f"{CONTACT_INST}\nNotes:\n\n\n{q}\nAnswer bits:\n")
    assert ex.prompt == expected
    assert ex.answer == "".join(str(bit(row, start, i, j)) for i, j in ex.meta["pairs"])


@pytest.mark.parametrize("sampling", ["balanced", "random"])
def test_contact_pairs_follow_the_rules(sampling):
    task = contact(pair_sampling=sampling, max_seq_len=60, num_pairs=10, pos_ratio=0.3, min_sep=6,
                   max_prompt_tokens=600)
    built = task._pool("train", 4) + task.eval_set("val", 2) + task.eval_set("test", 2)
    for ex in built:
        row, start, pairs = CONTACT_ROWS[ex.meta["name"]], ex.meta["window_start"], ex.meta["pairs"]
        assert len(pairs) == 10 and len({tuple(p) for p in pairs}) == 10
        for i, j in pairs:
            assert i < j and j - i >= 6 and j < 60 and row["valid_mask"][start + i] and row["valid_mask"][start + j]
        assert ex.answer == "".join(str(bit(row, start, i, j)) for i, j in pairs)
        if sampling == "balanced":
            assert ex.answer.count("1") == 3  # round(10 * 0.3)
        assert 590 <= len(ex.prompt_ids()) <= 600
    assert {ex.meta["name"][0] for ex in task._pool("train", 4)} == {"t"}  # splits train / valid / test
    assert {ex.meta["name"][0] for ex in task.eval_set("val", 2)} == {"v"}
    assert {ex.meta["name"][0] for ex in task.eval_set("test", 2)} == {"s"}


def test_contact_impossible_balance_is_reported():
    with pytest.raises(TaskError, match=r"dropped: too few contact and non-contact pairs"):
        contact(contact_cutoff=0.5, num_pairs=4).eval_set("val", 1)  # no pair is ever that close
    with pytest.raises(TaskError, match=r"num_pairs must be >= 2 for balanced pair_sampling"):
        contact(num_pairs=1)


def test_contact_pair_accuracy():
    task = contact()
    ex = task.eval_set("val", 1)[0]
    gold = ex.answer
    flipped = "".join("1" if b == "0" else "0" for b in gold)
    assert task.score(ex, gold) == {"pair_acc": 1.0, "seq_acc": 1.0}
    assert task.score(ex, flipped) == {"pair_acc": 0.0, "seq_acc": 0.0}
    assert task.score(ex, " ".join(gold[:4]) + gold[4:]) == {"pair_acc": 1.0, "seq_acc": 1.0}  # spaces ignored
    assert task.score(ex, flipped[:1] + gold[1:]) == {"pair_acc": pytest.approx(1 - 1 / len(gold)), "seq_acc": 0.0}
