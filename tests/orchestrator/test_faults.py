"""Fault injection through the worker hook (FSEARCH_FAULTS -> RunConfig.fault): every outcome is classified and
handled, and the round completes."""
from __future__ import annotations

import json
import time

import optuna
import pytest
from optuna.trial import TrialState

from orchestrator.study import default_storage_url

FAULT_CANDIDATES = [
    {"name": "f_oom", "fs": {"layer_start": 1, "alpha_init": -1.0}},
    {"name": "f_oomall", "fs": {"layer_start": 1, "alpha_init": -1.5}},
    {"name": "f_crash", "fs": {"layer_start": 2, "alpha_init": -1.0}},
    {"name": "f_crash1", "fs": {"layer_start": 2, "alpha_init": -1.5}},
    {"name": "f_diverge", "fs": {"layer_start": 3, "alpha_init": -1.0}},
    {"name": "f_data", "fs": {"layer_start": 3, "alpha_init": -1.5}},
]
FAULTS = {"*.f_oom.*": "oom", "*.f_oomall.*": "oom_always", "*.f_crash.*": "crash", "*.f_crash1.*": "crash_once",
          "*.f_diverge.*": "diverge", "*.f_data.*": "data"}


def trials_by_candidate(round_dir):
    study = optuna.load_study(study_name="r", storage=default_storage_url(round_dir))
    return {t.params["candidate"]: t for t in study.trials}


def attempt_dirs(round_dir, record):
    return sorted(p.name for p in (round_dir / "runs" / record.run_key).iterdir())


def test_each_fault_is_classified_and_the_round_completes(write_spec, fake_env, round_runner, tmp_path):
    spec = write_spec({"stages!": {"quick": {"steps": 4, "eval_every": 2, "seeds": [0]}},
                       "tasks": {"sud": {"batch": 8, "candidates": FAULT_CANDIDATES}}})
    fake_env.setenv("FSEARCH_FAULTS", json.dumps(FAULTS))
    fake_env.setenv("FAKE_WORKER_EFFECTS", json.dumps({"f_oom": 0.03, "f_crash1": 0.02}))
    sched, records = round_runner(spec)
    rd = tmp_path / "results" / "r"
    by = {r.candidate: r for r in records}
    assert list(by) == ["baseline", "f_oom", "f_oomall", "f_crash", "f_crash1", "f_diverge", "f_data"]
    trials = trials_by_candidate(rd)
    assert len(trials) == len(records) and all(t.state != TrialState.RUNNING for t in trials.values())

    # OOM: micro-batch halved, effective batch kept, then a normal result
    oom = by["f_oom"]
    assert (oom.status, oom.batch_size, oom.micro_batch, oom.grad_accum, oom.attempt) == ("ok", 8, 4, 2, 1)
    assert oom.decision == "promote" and oom.delta == pytest.approx(0.03, abs=1e-5)
    assert [h["outcome"] for h in trials["f_oom"].user_attrs["attempts"]] == ["oom", "ok"]
    assert trials["f_oom"].user_attrs["micro_batch"] == 4 and trials["f_oom"].state == TrialState.COMPLETE
    # OOM at every size: halved down to 1, then failed (bounded)
    oa = by["f_oomall"]
    assert (oa.status, oa.error_kind, oa.micro_batch, oa.grad_accum, oa.decision) == ("failed", "oom", 1, 8, "failed")
    assert "out of memory at micro-batch 1" in oa.error_message
    assert attempt_dirs(rd, oa) == ["attempt-0", "attempt-1", "attempt-2", "attempt-3"]  # 8, 4, 2, 1
    # crash: retries (defaults.retries = 2) then a failed record
    cr = by["f_crash"]
    assert (cr.status, cr.error_kind, cr.attempt) == ("failed", "crash", 2) and "injected crash" in cr.error_message
    assert len(attempt_dirs(rd, cr)) == 3 and trials["f_crash"].state == TrialState.FAIL
    # crash on the first attempt only: the retry succeeds
    c1 = by["f_crash1"]
    assert (c1.status, c1.attempt, c1.decision) == ("ok", 1, "promote")
    # non-finite loss: a result (diverged), the candidate is pruned
    dv = by["f_diverge"]
    assert (dv.status, dv.error_kind, dv.decision, dv.value, dv.attempt) == ("diverged", "diverged", "diverged", None, 0)
    assert trials["f_diverge"].state == TrialState.PRUNED
    # data error: fail fast, no retry
    da = by["f_data"]
    assert (da.status, da.error_kind, da.attempt) == ("failed", "data", 0) and attempt_dirs(rd, da) == ["attempt-0"]

    plan = sched.plan()
    assert plan.finished and plan.tasks["sud"].status == "done"
    reasons = {n: c.reason for n, c in plan.tasks["sud"].candidates.items()}
    assert "crash" in reasons["f_crash"] and "diverged" in reasons["f_diverge"] and "data" in reasons["f_data"]


def test_exit_code_fallback_when_the_worker_writes_no_result(write_spec, fake_env, round_runner, tmp_path):
    spec = write_spec({"stages!": {"quick": {"steps": 4, "eval_every": 2, "seeds": [0]}},
                       "defaults": {"retries": 1},
                       "tasks": {"sud": {"batch": 4, "candidates": FAULT_CANDIDATES[:3]}}})
    fake_env.setenv("FSEARCH_FAULTS", json.dumps(FAULTS))
    fake_env.setenv("FAKE_WORKER_NO_RESULT", "1")
    _, records = round_runner(spec)
    by = {r.candidate: r for r in records}
    assert (by["f_oom"].status, by["f_oom"].micro_batch, by["f_oom"].grad_accum) == ("ok", 2, 2)  # exit 10 -> oom
    assert (by["f_oomall"].error_kind, by["f_oomall"].micro_batch) == ("oom", 1)
    cr = by["f_crash"]
    assert (cr.status, cr.error_kind, cr.attempt) == ("failed", "crash", 1)
    assert "RuntimeError: injected crash (test hook)" in cr.error_message  # the worker log's last lines


def test_hang_past_the_time_limit_is_killed_retried_then_failed(write_spec, fake_env, round_runner, tmp_path,
                                                                 alive_after_grace):
    spec = write_spec({"stages!": {"quick": {"steps": 4, "eval_every": 2, "seeds": [0], "time_limit_s": 1.5}},
                       "defaults": {"retries": 1},
                       "tasks": {"sud": {"candidates": [{"name": "f_hang", "fs": {"layer_start": 1}}]}}})
    fake_env.setenv("FSEARCH_FAULTS", json.dumps({"*.f_hang.*": "hang"}))
    t0 = time.time()
    _, records = round_runner(spec)
    elapsed = time.time() - t0
    rd = tmp_path / "results" / "r"
    base, hang = records
    assert base.status == "ok"
    assert (hang.status, hang.error_kind, hang.attempt, hang.decision) == ("failed", "timeout", 1, "failed")
    assert "time limit of 1.5 s" in hang.error_message
    assert 3.0 <= elapsed < 30
    for d in (rd / "runs" / hang.run_key).iterdir():  # every attempt's whole process group is gone
        pid = int((d / "grandchild.pid").read_text())
        assert not alive_after_grace(pid), f"grandchild {pid} of {d.name} survived the time limit"
    assert trials_by_candidate(rd)["f_hang"].state == TrialState.FAIL
