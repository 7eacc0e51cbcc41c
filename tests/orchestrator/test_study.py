"""The study mirror: one trial per run with readable params, states from records, reconcile after a crash, WAL."""
from __future__ import annotations

import sqlite3
import time

import optuna
import pytest
from optuna.trial import TrialState

from orchestrator.study import RoundStudy, StudyError, default_storage_url, metric_curve, open_storage


@pytest.fixture
def study(tmp_path):
    s = RoundStudy.create_or_load(default_storage_url(tmp_path), "demo")
    s.fix_choices(["t", "u"], ["c0", "c1", "c2"])
    return s


def claim(s: RoundStudy, cand: str, seed: int = 0, task: str = "t", stage: str = "quick") -> int:
    return s.claim(task, stage, cand, seed, {"run_key": f"{task}.{stage}.{cand}.s{seed}-abc", "attempt": 0})


def test_trial_per_run_readable_with_plain_optuna(tmp_path, study, make_record):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "metrics.jsonl").write_text('{"step": 0, "val_hole_acc": 0.1}\n{"step": 10, "val_hole_acc": 0.5}\n')
    n0 = claim(study, "c0")
    n1 = claim(study, "c1", seed=3)
    n2 = claim(study, "c2", stage="med")
    study.finish(n0, make_record(0, run_dir=str(tmp_path / "m"), decision="promote"))
    study.finish(n1, make_record(1, run_key="t.quick.c1.s3-abc", seed=3, decision="prune"))
    study.finish(n2, make_record(2, run_key="t.med.c2.s0-abc", stage="med", status="failed", value=None,
                                 decision="failed", error_kind="crash"))
    loaded = optuna.load_study(study_name="demo", storage=default_storage_url(tmp_path))
    trials = loaded.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert trials[0].params == {"task": "t", "stage": "quick", "candidate": "c0", "seed": 0}
    assert trials[1].params["seed"] == 3 and trials[2].params["stage"] == "med"
    assert trials[0].value == pytest.approx(0.5) and trials[0].intermediate_values == {0: 0.1, 10: 0.5}
    assert trials[1].value == pytest.approx(0.51)  # a pruned trial carries its value
    assert trials[0].user_attrs["decision"] == "promote" and trials[2].user_attrs["error_kind"] == "crash"
    assert trials[0].user_attrs["run_key"] == "t.quick.c0.s0-abc"
    study.finish(n0, make_record(0))  # idempotent on a finished trial
    assert len(loaded.trials) == 3


def test_reconcile_tells_adopts_and_mirrors(study, make_record):
    n_rec = claim(study, "c0")  # killed after its record was written, before the tell
    n_open = claim(study, "c1")  # killed mid-run: no record
    n_dup = claim(study, "c1")  # a duplicate RUNNING trial of the same run (never created by fsearch, but repaired)
    lost = make_record(2, run_key="t.quick.c2.s0-abc")  # a record whose trial is gone (e.g. study.db replaced)
    adoptable = study.reconcile([make_record(0), lost])
    assert adoptable == {"t.quick.c1.s0-abc": n_open}
    states = {t.number: t.state for t in study.trials()}
    assert states[n_rec] == TrialState.COMPLETE
    assert states[n_open] == TrialState.RUNNING
    assert states[n_dup] == TrialState.FAIL
    mirrored = [t for t in study.trials() if t.user_attrs.get("run_key") == lost.run_key]
    assert len(mirrored) == 1 and mirrored[0].state == TrialState.COMPLETE and mirrored[0].user_attrs["mirrored"]
    # a second reconcile changes nothing
    assert study.reconcile([make_record(0), lost]) == adoptable
    assert len(study.trials()) == 4


def test_choices_fixed_once_trials_exist(tmp_path, study):
    claim(study, "c0")
    study.fix_choices(["t"], ["c1"])  # a subset: fine
    with pytest.raises(StudyError, match="candidate label.*'new_one'.*new `round:` name"):
        study.fix_choices(["t"], ["c1", "new_one"])
    with pytest.raises(StudyError, match="task label"):
        study.fix_choices(["t", "v"], ["c1"])
    fresh = RoundStudy.create_or_load(default_storage_url(tmp_path / "other"), "x")
    fresh.fix_choices(["a"], ["b"])
    fresh.fix_choices(["a", "z"], ["b", "q"])  # no trial yet: the choices may still change
    assert fresh.choices == {"task": ["a", "z"], "candidate": ["b", "baseline", "q"]}


def test_load_never_creates_a_database(tmp_path):
    url = default_storage_url(tmp_path / "none")
    assert RoundStudy.load(url, "demo") is None
    assert not (tmp_path / "none" / "study.db").exists()


def test_sqlite_is_wal_and_a_reader_does_not_block_the_writer(tmp_path, study):
    db = tmp_path / "study.db"
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reader = sqlite3.connect(db, timeout=0.1)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM trials").fetchone()  # holds a read snapshot
    t0 = time.time()
    claim(study, "c0")
    assert time.time() - t0 < 5.0
    reader.execute("SELECT COUNT(*) FROM trials").fetchone()
    reader.rollback()
    reader.close()
    other = RoundStudy.load(default_storage_url(tmp_path), "demo")
    assert len(other.running()) == 1


def test_bad_storage_url_is_a_one_line_error(tmp_path):
    with pytest.raises(StudyError, match="storage"):
        open_storage("mysql://x")
    with pytest.raises(StudyError, match="cannot open|driver"):
        open_storage("postgresql://nobody@127.0.0.1:1/nothing")


def test_metric_curve_skips_bad_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val_x": 1}\nnot json\n{"step": 2, "val_x": NaN}\n'
                                            '{"step": 4, "val_x": 0.5}\n')
    assert metric_curve(tmp_path, "x") == {0: 1.0, 4: 0.5}
    assert metric_curve(tmp_path / "missing", "x") == {}


def test_read_only_snapshot_matches_optuna(tmp_path, study, make_record):
    from orchestrator.study import read_snapshot

    n0 = claim(study, "c0")
    claim(study, "c1", seed=2)
    study.set_attrs(n0, {"attempt": 1})
    study.finish(n0, make_record(0))
    url = default_storage_url(tmp_path)
    snap = read_snapshot(url, "demo")
    assert snap.counts == {"COMPLETE": 1, "RUNNING": 1}
    (t,) = snap.running
    assert t.number == 1 and t.user_attrs["run_key"] == "t.quick.c1.s2-abc" and t.started is not None
    assert read_snapshot(url, "other") is None
    assert read_snapshot(default_storage_url(tmp_path / "none"), "demo") is None
    assert not (tmp_path / "none").exists()
