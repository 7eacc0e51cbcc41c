"""Shared real-data machinery: sources (JSONL / parquet / saved folders / hub ids), offline checks, hash splits,
count errors, the token cache, prompt fitting. Everything runs offline from tests/tasks/fixtures."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model.tokenizers import get_tokenizer
from tasks import DataUnavailable, TaskError, get_task
from tasks.real import common
from tasks.real.common import HASH_BUCKETS, cut_context_start, fill_notes, hash_bucket

FIXTURES = Path(__file__).parent / "fixtures"
TOK = get_tokenizer("world")
REAL = ("punc_restore", "protein_ss_spot", "protein_contact_pair", "mbpp", "hotpot", "arc")


pytestmark = pytest.mark.usefixtures("offline_hf")


def arc(dataset, **kw):
    return get_task("arc", {"dataset": str(dataset), "n_train": 4, "n_val": 2, "n_test": 2, **kw}, TOK, 0)


# ---------------------------------------------------------------------------------------------------- data sources


def test_jsonl_parquet_and_saved_folders_give_the_same_examples(tmp_path):
    import datasets

    ref = arc(FIXTURES / "ai2_arc")
    want = [e.prompt for e in ref.eval_set("val", 2)] + [e.prompt for e in ref.eval_set("test", 2)]
    splits = {s: datasets.load_dataset("json", data_files=str(FIXTURES / "ai2_arc" / f"{s}.jsonl"), split="train",
                                       cache_dir=str(tmp_path / "hfc")) for s in ("train", "validation", "test")}
    parquet = tmp_path / "arc_parquet" / "ARC-Challenge"
    parquet.mkdir(parents=True)
    for s, ds in splits.items():  # the hub's export layout: {config}/{split}-00000-of-00001.parquet
        ds.to_parquet(str(parquet / f"{s}-00000-of-00001.parquet"))
    saved = tmp_path / "arc_saved"
    datasets.DatasetDict(splits).save_to_disk(str(saved))
    for source in (parquet.parent, saved):
        task = arc(source)
        task.check_available()
        got = [e.prompt for e in task.eval_set("val", 2)] + [e.prompt for e in task.eval_set("test", 2)]
        assert got == want, source


def test_single_file_and_saved_dataset_are_hash_split(tmp_path):
    import datasets

    single = FIXTURES / "ai2_arc" / "train.jsonl"
    saved = tmp_path / "one_split"
    datasets.load_dataset("json", data_files=str(single), split="train",
                          cache_dir=str(tmp_path / "hfc")).save_to_disk(str(saved))
    for source in (single, saved):
        task = get_task("arc", {"dataset": str(source), "n_train": 1, "n_val": 1, "n_test": 1}, TOK, 0)
        ids = {role: {r["id"] for _, r in task.role_rows(role)} for role in ("train", "val", "test")}
        assert ids["train"] and not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"])
        assert not (ids["val"] & ids["test"])
        assert len(ids["train"]) + len(ids["val"]) + len(ids["test"]) == 8
        for role, rows in ids.items():
            assert all(hash_bucket(i) in HASH_BUCKETS[frozenset({"train", "val", "test"})][role] for i in rows)


def test_val_and_test_share_the_validation_split_by_hash():
    task = get_task("hotpot", {"dataset": str(FIXTURES / "hotpot_qa"), "n_train": 2, "n_val": 2, "n_test": 2,
                               "min_prompt_tokens": 0}, TOK, 0)
    val = {e.meta["id"] for e in task.eval_set("val", 2)}
    test = {e.meta["id"] for e in task.eval_set("test", 2)}
    train = {r["id"] for _, r in task.role_rows("train")}
    assert not (val & test) and not (val & train) and not (test & train)
    assert all(hash_bucket(i) < 5 for i in val) and all(hash_bucket(i) >= 5 for i in test)


def test_missing_local_data_is_one_clear_line(tmp_path):
    with pytest.raises(DataUnavailable, match=r"^arc: dataset path '.*nowhere' does not exist$"):
        arc(tmp_path / "nowhere").check_available()
    folder = tmp_path / "partial"
    folder.mkdir()
    shutil.copy(FIXTURES / "ai2_arc" / "train.jsonl", folder)
    with pytest.raises(DataUnavailable) as e:
        arc(folder).check_available()
    assert "no data for split 'validation'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", REAL)
def test_absent_hub_dataset_offline_fails_validation_with_one_line(name):
    task = get_task(name, {}, TOK, 0)  # the defaults name the original hub datasets
    with pytest.raises(DataUnavailable) as e:
        task.check_available()
    msg = str(e.value)
    assert "\n" not in msg and "is not available offline" in msg
    assert repr(task.params.dataset) in msg and "local JSONL/parquet/saved-dataset path" in msg
    assert "HF_HUB_OFFLINE" in msg


def test_offline_message_text():
    with pytest.raises(DataUnavailable) as e:
        get_task("mbpp", {}, TOK, 0).check_available()
    assert str(e.value) == ("mbpp: dataset 'mbpp' (config 'full') is not available offline (set params.dataset to a "
                            "local JSONL/parquet/saved-dataset path, or unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE to "
                            "download it)")


def fake_hub_cache(hf_home: Path, name: str, config: str, splits: dict[str, int]) -> None:
    build = hf_home / "datasets" / name / config / "0.0.0" / "0123abcd"
    build.mkdir(parents=True)
    info = {"config_name": config, "splits": {s: {"name": s, "num_examples": n} for s, n in splits.items()}}
    (build / "dataset_info.json").write_text(json.dumps(info))


def test_cached_hub_dataset_is_available_and_counts_are_checked(tmp_path):
    fake_hub_cache(tmp_path / "hf", "mbpp", "full", {"train": 374, "validation": 90, "test": 500, "prompt": 10})
    get_task("mbpp", {}, TOK, 0).check_available()
    with pytest.raises(TaskError, match=r"split 'train' has 374 examples; n_train=900 requested$"):
        get_task("mbpp", {"n_train": 900}, TOK, 0).check_available()
    with pytest.raises(TaskError, match=r"split 'validation' has 90 examples; n_val=180 requested$"):
        get_task("mbpp", {"n_val": 180}, TOK, 0).check_available()
    with pytest.raises(DataUnavailable, match=r"split 'valid' does not exist \(cached splits: prompt, test, train"):
        get_task("mbpp", {"val_split": "valid"}, TOK, 0).check_available()


def test_hub_id_is_served_offline_from_the_datasets_cache(tmp_path, monkeypatch):
    """Put the mbpp fixture into the datasets cache under the hub id `mbpp` (config `full`), as a download would,
    then build the task by its default hub id with the network off."""
    import datasets

    repo = tmp_path / "download" / "mbpp"
    (repo / "full").mkdir(parents=True)
    for split in ("train", "validation", "test"):
        ds = datasets.load_dataset("json", data_files=str(FIXTURES / "mbpp" / f"{split}.jsonl"), split="train",
                                   cache_dir=str(tmp_path / "scratch"))
        ds.to_parquet(str(repo / "full" / f"{split}-00000-of-00001.parquet"))
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: full\n  data_files:\n" + "".join(
        f"  - split: {s}\n    path: full/{s}-*\n" for s in ("train", "validation", "test")) + "---\n")
    datasets.load_dataset(str(repo), "full", cache_dir=str(tmp_path / "hf" / "datasets"))  # fills the cache
    shutil.rmtree(repo.parent)
    monkeypatch.chdir(tmp_path)  # no local folder named mbpp can shadow the hub id
    params = {"n_train": 10, "n_val": 5, "n_test": 5, "min_prompt_tokens": 0, "max_prompt_tokens": 400}
    hub = get_task("mbpp", params, TOK, 0)
    assert hub.split_ref("train").kind == "hub"
    hub.check_available()
    local = get_task("mbpp", {**params, "dataset": str(FIXTURES / "mbpp")}, TOK, 0)
    assert [e.prompt for e in hub.eval_set("val", 5)] == [e.prompt for e in local.eval_set("val", 5)]
    with pytest.raises(TaskError, match=r"split 'train' has 10 examples; n_train=11 requested"):
        get_task("mbpp", {**params, "n_train": 11}, TOK, 0).check_available()


def test_online_but_unreachable_hub_is_reported(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(DataUnavailable, match=r"is not in the local cache .* cannot be reached"):
        get_task("arc", {}, TOK, 0).check_available()


def test_too_few_examples_names_the_numbers():
    mbpp = {"dataset": str(FIXTURES / "mbpp"), "min_prompt_tokens": 0, "max_prompt_tokens": 400}
    with pytest.raises(TaskError, match=r"^mbpp: dataset '.*mbpp' \(config 'full'\) split 'train' has 10 "
                                        r"examples; n_train=50 requested$"):
        get_task("mbpp", {**mbpp, "n_train": 50}, TOK, 0).check_available()
    task = get_task("mbpp", {**mbpp, "n_train": 50}, TOK, 0)
    with pytest.raises(TaskError, match=r"split 'train' gives 10 usable examples from 10 rows; n_train=50 requested$"):
        task.train_examples(0)  # raised on the call, not on the first draw
    task = get_task("mbpp", {**mbpp, "n_val": 5}, TOK, 0)
    with pytest.raises(TaskError, match=r"split 'validation' gives 5 usable examples from 5 rows; n_val=6 requested"):
        task.eval_set("val", 6)
    # drops are counted by reason
    task = get_task("mbpp", {**mbpp, "min_prompt_tokens": 390, "fill_notes": False}, TOK, 0)
    with pytest.raises(TaskError, match=r"gives 0 usable examples from 5 rows \(5 dropped: prompt under "
                                        r"min_prompt_tokens\); n_val=80 requested"):
        task.eval_set("val", 1)


def test_bad_params_are_one_line_naming_the_field():
    with pytest.raises(TaskError, match=r"^task hotpot: params.layout: Input should be 'question_last' or "
                                        r"'question_first'"):
        get_task("hotpot", {"layout": "q_first"}, TOK, 0)
    with pytest.raises(TaskError, match=r"params.q_first: Extra inputs are not permitted"):
        get_task("mbpp", {"q_first": True}, TOK, 0)
    with pytest.raises(TaskError, match=r"min_prompt_tokens \(900\) exceeds max_prompt_tokens \(512\)"):
        get_task("arc", {"min_prompt_tokens": 900}, TOK, 0)


# ----------------------------------------------------------------------------------------------------- determinism


def test_sets_are_fixed_by_data_seed_and_prefixes_of_each_other():
    params = {"dataset": str(FIXTURES / "mbpp"), "n_train": 6, "n_val": 3, "n_test": 3, "min_prompt_tokens": 0,
              "max_prompt_tokens": 300}
    a, b = get_task("mbpp", params, TOK, 0), get_task("mbpp", params, TOK, 0)
    assert a.eval_set("val", 3) == b.eval_set("val", 3)
    assert a.eval_set("val", 2) == a.eval_set("val", 3)[:2]
    assert get_task("mbpp", {**params, "n_val": 5}, TOK, 0).eval_set("val", 3) == a.eval_set("val", 3)
    other = get_task("mbpp", params, TOK, 1).eval_set("val", 3)
    assert [e.prompt for e in other] != [e.prompt for e in a.eval_set("val", 3)]
    # the training stream: fixed pool, order by seed
    take = lambda task, seed: [next(s) for s in [task.train_examples(seed)] for _ in range(12)]
    assert take(a, 0) == take(b, 0) and take(a, 0) != take(a, 1)
    assert {e.meta["task_id"] for e in take(a, 3)} <= {e.meta["task_id"] for e in a._pool("train", 6)}
    assert not {e.meta["task_id"] for e in a._pool("train", 6)} & {e.meta["task_id"] for e in a.eval_set("val", 3)}


def test_token_ids_match_the_text():
    for name, params in [("hotpot", {"dataset": str(FIXTURES / "hotpot_qa"), "min_prompt_tokens": 0, "n_val": 4}),
                         ("arc", {"dataset": str(FIXTURES / "ai2_arc"), "n_val": 4})]:
        for ex in get_task(name, params, TOK, 0).eval_set("val", 4):
            assert list(ex.context_ids) == TOK.encode(ex.context) and list(ex.trigger_ids) == TOK.encode(ex.trigger)
            assert list(ex.answer_ids) == TOK.encode(ex.answer)


# ------------------------------------------------------------------------------------------------------ token cache


def test_token_cache_is_reused_and_keyed_by_params_version_and_data(tmp_path, monkeypatch):
    data = tmp_path / "arc"
    shutil.copytree(FIXTURES / "ai2_arc", data)
    cache = tmp_path / "cache"
    first = arc(data).eval_set("val", 2)
    files = set(cache.iterdir())
    assert len(files) == 1

    def no_loading(ref):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(common, "load_split", no_loading)
    assert arc(data).eval_set("val", 2) == first  # from the cache, nothing loaded
    monkeypatch.undo()
    monkeypatch.setenv("FSEARCH_TASK_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    arc(data, layout="question_first").eval_set("val", 2)  # another parameter: another entry
    assert len(set(cache.iterdir())) == 2
    from tasks.real.arc import ARC

    monkeypatch.setattr(ARC, "TEMPLATE_VERSION", ARC.TEMPLATE_VERSION + 1)  # the template changed
    arc(data).eval_set("val", 2)
    assert len(set(cache.iterdir())) == 3
    monkeypatch.undo()
    monkeypatch.setenv("FSEARCH_TASK_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    rows = (data / "validation.jsonl").read_text().splitlines()  # the data changed
    (data / "validation.jsonl").write_text("\n".join(rows[1:] + rows[:1]) + "\n")
    arc(data).eval_set("val", 2)
    assert len(set(cache.iterdir())) == 4  # a new entry, though every parameter is the same

    monkeypatch.setenv("FSEARCH_TASK_CACHE", "off")
    arc(data).eval_set("val", 2)
    assert len(set(cache.iterdir())) == 4


# --------------------------------------------------------------------------------------------------- prompt fitting


def test_fill_notes_fits_the_budget_and_keeps_head_and_tail():
    head, tail, trig = "Q: what is kept?\nNotes:\n", "\n\nEnd of question.", len(TOK.encode("\nA:"))
    notes = iter(["\n\nnote number %d with some words, fine." % i for i in range(1000)])
    fitted = fill_notes(TOK, head, tail, trig, notes, 120, 1000)
    ctx = fitted.text
    assert ctx.startswith(head) and ctx.endswith(tail) and fitted.ids == TOK.encode(ctx)
    assert 110 <= len(fitted.ids) + trig <= 120
    assert fill_notes(TOK, head, tail, trig, iter(["x"]), 5, 10) is None  # the question alone does not fit
    assert fill_notes(TOK, head, tail, trig, iter(["\n\nnote"] * 5), 120, 0).text == head + tail


def test_cut_context_start_drops_the_far_end_only():
    head, tail = "Context:\n", "\n\nQuestion:\nWhich word comes last?"
    material = " ".join(f"word{i}" for i in range(400)) + " final."
    trig = len(TOK.encode("\n\nAnswer:"))
    ctx, ids, cut = cut_context_start(TOK, head, material, tail, trig, 100)
    assert cut and ctx.startswith(head + "word") and ctx.endswith("final." + tail)
    assert ids == TOK.encode(ctx) and len(ids) + trig <= 100
    kept = ctx[len(head):-len(tail)]
    assert material.endswith(kept) and material[len(material) - len(kept) - 1] == " "  # whole words only
    assert cut_context_start(TOK, head, "short", tail, trig, 100)[::2] == (head + "short" + tail, False)
    assert cut_context_start(TOK, head, material, tail, trig, 10) is None


# ------------------------------------------------------------------------------------------------------ import cost


def test_building_a_real_task_never_imports_torch(tmp_path):
    code = ("import sys, tasks\n"
            "from model.tokenizers import get_tokenizer\n"
            f"t = tasks.get_task('hotpot', {{'dataset': {str(FIXTURES / 'hotpot_qa')!r}, 'min_prompt_tokens': 0, "
            "'n_train': 2, 'n_val': 2, 'n_test': 2}, get_tokenizer('byte'))\n"
            "t.check_available(); t.eval_set('val', 2)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    env = {**os.environ, "FSEARCH_TASK_CACHE": "off", "HF_HOME": str(tmp_path / "hf")}
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# ------------------------------------------------------------------------------------------ the ported round specs

ROUND_SPECS = sorted((Path(__file__).parents[2] / "studies").glob("round*.yaml"))


def real_tasks_of(path: Path) -> list[tuple[str, str, dict]]:
    import yaml

    spec = yaml.safe_load(path.read_text())
    return [(label, t["task"], t.get("params") or {}) for label, t in (spec.get("tasks") or {}).items()
            if t.get("task") in REAL]


@pytest.mark.skipif(not ROUND_SPECS, reason="no ported round specs in studies/")
@pytest.mark.parametrize("path", ROUND_SPECS, ids=lambda p: p.stem)
def test_ported_round_specs_take_these_params_and_name_absent_data(path):
    for label, name, params in real_tasks_of(path):
        task = get_task(name, params, TOK, 0)  # every parameter name and value is accepted
        with pytest.raises(DataUnavailable) as e:
            task.check_available()  # offline, empty cache
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{name}: dataset {task.params.dataset!r}"), (label, msg)
        assert "is not available offline" in msg, (label, msg)
