"""The round loop with the fake worker: a round runs to completion, the study mirrors the ledger one trial per run,
a rerun reruns nothing, batch probes run once per task, outcomes are classified from result.json or exit codes."""
from __future__ import annotations

import io
import json
import os
import time

import optuna
import pytest
from optuna.trial import TrialState

from orchestrator.records import Ledger
from orchestrator.runconfig import EXIT_CRASH, EXIT_DATA, EXIT_OK, EXIT_OOM
from orchestrator.errors import UserError
from orchestrator.faults import KillPoints, RoundEvents, fault_for, parse_faults
from orchestrator.outcomes import classify, halve_micro_batch
from orchestrator.processes import WorkerProcess, worker_command
from orchestrator.scheduler import RoundLocked, SchedulerError
from orchestrator.study import default_storage_url

TIMING_FIELDS = ("wall_s", "tokens_per_s", "finished_at", "run_dir", "attempt", "peak_mem_bytes",
                 "first_step_s")


def comparable(records):
    return [{k: v for k, v in r.model_dump().items() if k not in TIMING_FIELDS} for r in records]


def load_trials(round_dir, name="r"):
    return optuna.load_study(study_name=name, storage=default_storage_url(round_dir)).trials


def test_round_runs_to_completion(write_spec, fake_env, round_runner, tmp_path):
    sched, records = round_runner(write_spec())
    rd = tmp_path / "results" / "r"
    keys = [(r.stage, r.candidate, r.seed) for r in records]
    assert keys == [("quick", "baseline", 0), ("quick", "scalar_l1_trainable", 0), ("quick", "scalar_l2_trainable", 0),
                    ("seedcheck", "baseline", 0), ("seedcheck", "baseline", 1),
                    ("seedcheck", "scalar_l1_trainable", 0), ("seedcheck", "scalar_l1_trainable", 1)]
    by = {(r.stage, r.candidate, r.seed): r for r in records}
    l1, l2 = by[("quick", "scalar_l1_trainable", 0)], by[("quick", "scalar_l2_trainable", 0)]
    assert l1.decision == "promote" and l1.delta == pytest.approx(0.02, abs=1e-5)
    assert l2.decision == "prune" and l2.delta == pytest.approx(-0.02, abs=1e-5)
    assert l1.baseline_key == by[("quick", "baseline", 0)].run_key
    assert by[("seedcheck", "scalar_l1_trainable", 1)].baseline_key == by[("seedcheck", "baseline", 1)].run_key
    assert by[("seedcheck", "scalar_l1_trainable", 1)].decision == "recorded"
    assert (l1.batch_size, l1.micro_batch, l1.grad_accum, l1.steps, l1.budget_steps) == (8, 8, 1, 4, 4)
    assert l1.best_val_loss == l1.best["val_loss"] and l1.best_val_tok_acc == l1.best["val_tok_acc"]
    assert l1.metric == "hole_acc" and l1.value == l1.final["val_hole_acc"]
    assert Ledger(rd / "records.jsonl").read() == records
    for r in records:
        d = rd / "runs" / r.run_key / "attempt-0"
        assert r.run_dir == str(d) and {"run.json", "result.json", "metrics.jsonl", "worker.log"} <= set(os.listdir(d))
    assert (rd / "spec.yaml").exists() and not (rd / "scheduler.pid").exists()

    trials = load_trials(rd)
    assert len(trials) == len(records)
    assert all(t.state != TrialState.RUNNING for t in trials)
    assert [t.user_attrs["run_key"] for t in trials] == [r.run_key for r in records]
    t_l2 = next(t for t in trials if t.params["candidate"] == "scalar_l2_trainable")
    assert t_l2.state == TrialState.PRUNED and t_l2.params == {"task": "sud", "stage": "quick",
                                                               "candidate": "scalar_l2_trainable", "seed": 0}
    assert sorted(t_l2.intermediate_values) == [0, 2, 4]

    # the same command again: nothing is rerun, nothing recorded twice
    mtime = (rd / "records.jsonl").stat().st_mtime_ns
    _, again = round_runner(write_spec())
    assert again == records and (rd / "records.jsonl").stat().st_mtime_ns == mtime
    assert len(load_trials(rd)) == len(records)


def test_failed_baseline_fails_its_task_and_the_other_task_goes_on(write_spec, fake_env, round_runner, tmp_path):
    spec = write_spec({"tasks!": {"a": {"task": "sudoku", "params": {"base": 2, "mask_count": 4}, "batch": 4,
                                       "threshold": 0.0, "candidates": ["scalar_l1_trainable"]},
                                 "b": {"task": "sudoku", "params": {"base": 2, "mask_count": 5}, "batch": 4,
                                       "threshold": 0.0, "candidates": ["scalar_l1_trainable"]}},
                       "stages": {"seedcheck": None}})
    fake_env.setenv("FSEARCH_FAULTS", json.dumps({"a.quick.baseline.*": "data"}))
    sched, records = round_runner(spec)
    a = [r for r in records if r.task == "a"]
    assert [(r.candidate, r.status, r.error_kind, r.decision) for r in a] == [("baseline", "failed", "data", "failed")]
    assert [r.candidate for r in records if r.task == "b"] == ["baseline", "scalar_l1_trainable"]
    plan = sched.plan()
    assert plan.tasks["a"].status == "failed" and "baseline failed" in plan.tasks["a"].reason
    assert plan.tasks["b"].status == "done"
    states = {t.params["task"] + "." + t.params["candidate"]: t.state for t in load_trials(tmp_path / "results" / "r")}
    assert states == {"a.baseline": TrialState.FAIL, "b.baseline": TrialState.COMPLETE,
                      "b.scalar_l1_trainable": TrialState.COMPLETE}


def test_batch_probe_runs_once_per_task_and_is_reused(write_spec, fake_env, round_runner, tmp_path):
    fake_env.setenv("FAKE_PROBE_MAX", "6")
    spec = write_spec({"defaults": {"device": "auto", "probe": {"micro_batches": [16, 8, 4, 2]}},
                       "tasks": {"sud": {"batch": "auto"}}, "stages": {"seedcheck": None}})
    sched, records = round_runner(spec)
    rd = tmp_path / "results" / "r"
    probe = json.loads((rd / "probe" / "sud.json").read_text())
    assert probe["micro_batch"] == 4 and [t["micro_batch"] for t in probe["tried"]] == [16, 8, 4]
    assert all((r.batch_size, r.micro_batch, r.grad_accum) == (4, 4, 1) for r in records)
    request = json.loads((rd / "probe" / "sud" / "PROBE.json").read_text())
    assert request["candidates"] == [16, 8, 4, 2] and request["margin"] == 0.9
    assert request["run"]["mode"] == "prompt_fs"  # the heaviest candidate, not the baseline
    study = optuna.load_study(study_name="r", storage=default_storage_url(rd))
    assert study.user_attrs["probe.sud"]["micro_batch"] == 4
    mtime = (rd / "probe" / "sud" / "probe_result.json").stat().st_mtime_ns
    fake_env.setenv("FAKE_PROBE_MAX", "2")  # a second probe would pick 2: it must not run
    _, again = round_runner(spec)
    assert again == records
    assert (rd / "probe" / "sud" / "probe_result.json").stat().st_mtime_ns == mtime
    (rd / "probe" / "sud.json").unlink()  # a lost probe file: the records' batch is kept, nothing reruns
    _, again = round_runner(spec)
    assert again == records and (rd / "probe" / "sud" / "probe_result.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("worker", ["warm", "fresh"])
def test_a_warm_worker_runs_the_batch_probe_in_the_process_that_runs_the_round(write_spec, fake_env, round_runner,
                                                                                tmp_path, worker):
    """With warm workers the probe is the process's first job (its start-up is paid once, for probe and runs);
    with `worker: fresh` it is a process of its own, as each run is."""
    fake_env.setenv("FAKE_PROBE_MAX", "4")
    spec = write_spec({"defaults": {"device": "auto", "worker": worker, "probe": {"micro_batches": [8, 4]}},
                       "tasks": {"sud": {"batch": "auto"}}, "stages": {"seedcheck": None}})
    _, records = round_runner(spec)
    rd = tmp_path / "results" / "r"
    assert records and all(r.micro_batch == 4 for r in records)
    probe_pid = json.loads((rd / "probe" / "sud" / "probe_result.json").read_text())["pid"]
    run_pids = {json.loads(f.read_text())["pid"] for f in rd.glob("runs/*/attempt-*/config.json")}
    if worker == "warm":
        assert run_pids == {probe_pid}
    else:
        assert len(run_pids) == len(records) and probe_pid not in run_pids


def test_batch_probe_failure_is_one_clear_error(write_spec, fake_env, round_runner):
    spec = write_spec({"defaults": {"device": "auto"}, "tasks": {"sud": {"batch": "auto"}}})
    fake_env.setenv("FSEARCH_FAULTS", json.dumps({"sud.probe": "data"}))
    with pytest.raises(SchedulerError, match=r"tasks\.sud\.batch: the batch probe failed \(data\)"):
        round_runner(spec)
    fake_env.setenv("FSEARCH_FAULTS", "{}")
    fake_env.setenv("FAKE_PROBE_MAX", "0")
    with pytest.raises(SchedulerError, match=r"\(oom\): no candidate micro-batch fits"):
        round_runner(spec)


def test_cpu_round_uses_the_documented_cpu_batch(write_spec, fake_env, round_runner, tmp_path):
    spec = write_spec({"defaults": {"probe": {"cpu_batch": 2}}, "tasks": {"sud": {"batch": "auto"}},
                       "stages": {"seedcheck": None}})
    _, records = round_runner(spec)
    assert {r.batch_size for r in records} == {2}
    assert not (tmp_path / "results" / "r" / "probe" / "sud").exists()  # no probe process on a CPU round


def test_summary_and_plain_display(write_spec, fake_env, round_runner):
    from orchestrator.progress import PlainDisplay, format_summary, format_table, status_rows

    out = io.StringIO()
    sched, records = round_runner(write_spec(), display=PlainDisplay(out))
    log = out.getvalue()
    assert "[sud quick] scalar_l2_trainable s0: ok hole_acc=" in log and "-> prune" in log
    summary = format_summary(records, sched.plan(), ["sud"])
    lines = summary.splitlines()
    assert lines[0].startswith("[sud] sudoku, metric hole_acc, threshold +0.0000: done (finalists: scalar_l1_trainable)")
    assert any("scalar_l2_trainable" in ln and "delta -0.0200" in ln and "prune" in ln for ln in lines)
    assert any(ln.strip().startswith("seedcheck (6 steps): baseline") and "mean of 2 seeds" in ln for ln in lines)
    table = format_table(status_rows(records, sched.plan(), None, {"quick": 4, "seedcheck": 6}))
    assert "sud   quick      complete  3/3" in table.replace("  ", "  ")


# ---------------------------------------------------------------------------------------------------------------------
# pieces

class PointsSeen(RoundEvents):
    """An observer that keeps every point the loop reports, with the run key it reached it for."""

    def __init__(self):
        self.points: list[str] = []

    def reached(self, point, **context):
        self.points.append(point)
        if point == "torn_record":
            assert {"ledger", "record"} <= set(context)  # what the kill point needs to leave half a line


def test_the_loop_reports_each_moment_of_a_run_to_its_observer(write_spec, fake_env, round_runner):
    seen = PointsSeen()
    _, records = round_runner(write_spec(), events=seen)
    per_run = ["claim", "spawn", "outcome", "torn_record", "record", "tell"]
    points = [p for p in seen.points if p != "run"]  # "run" only when a poll finds progress.json: timing-dependent
    # 3 quick runs, the stage change, 4 seedcheck runs: in the order KILL_POINTS lists them
    assert points == per_run * 3 + ["stage"] + per_run * 4 and len(records) == 7


def test_scheduler_errors_are_user_errors():
    assert issubclass(SchedulerError, UserError) and issubclass(RoundLocked, SchedulerError)


def test_halve_micro_batch_keeps_a_divisor_of_the_batch():
    assert halve_micro_batch(16, 16) == 8
    assert halve_micro_batch(12, 12) == 6 and halve_micro_batch(6, 12) == 3 and halve_micro_batch(3, 12) == 1
    assert halve_micro_batch(10, 10) == 5 and halve_micro_batch(5, 10) == 2
    assert halve_micro_batch(1, 8) is None


def write_result(d, **kw):
    d.mkdir(parents=True, exist_ok=True)
    (d / "result.json").write_text(json.dumps(kw))


def test_classify_prefers_result_json_then_exit_code(tmp_path):
    log = tmp_path / "worker.log"
    log.write_text("line 1\nTraceback (most recent call last):\n  ...\nRuntimeError: boom\n")
    d = tmp_path / "a"
    write_result(d, status="ok", steps=3, final={"val_x": 1.0})
    assert classify(d, EXIT_OK, False, log, 10).kind == "ok"
    write_result(d, status="diverged", error_kind="diverged", error_message="nan at 3")
    o = classify(d, EXIT_OK, False, log, 10)
    assert o.kind == "diverged" and o.is_result
    write_result(d, status="failed", error_kind="oom", error_message="cuda oom")
    assert classify(d, EXIT_OOM, False, log, 10).kind == "oom"
    write_result(d, status="failed", error_kind="data", error_message="no data")
    assert (classify(d, EXIT_DATA, False, log, 10).kind, classify(d, EXIT_DATA, False, log, 10).message) == \
        ("data", "no data")
    e = tmp_path / "empty"
    e.mkdir()
    assert classify(e, EXIT_OOM, False, log, 10).kind == "oom"
    assert classify(e, EXIT_DATA, False, log, 10).kind == "data"
    o = classify(e, EXIT_CRASH, False, log, 10)
    assert o.kind == "crash" and "RuntimeError: boom" in o.message
    assert classify(e, 77, False, log, 10).kind == "crash"
    assert "signal 9" in classify(e, -9, False, log, 10).message
    assert "without writing result.json" in classify(e, EXIT_OK, False, log, 10).message
    write_result(d, status="ok")
    assert classify(d, -15, True, log, 2.5).kind == "timeout"  # the time limit wins over a late result


def test_worker_process_time_limit_kills_the_group(tmp_path, alive_after_grace):
    script = tmp_path / "w.py"
    script.write_text("import subprocess, sys, time\n"
                      "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                      f"open({str(tmp_path / 'child')!r}, 'w').write(str(c.pid))\n"
                      "time.sleep(60)\n")
    p = WorkerProcess([os.sys.executable, str(script)], tmp_path / "log")
    t0 = time.time()
    while not (tmp_path / "child").exists() and time.time() - t0 < 10:
        time.sleep(0.02)
    code = p.wait(0.3, poll_s=0.05, term_grace_s=0.5)
    assert p.timed_out and code < 0 and time.time() - t0 < 10
    child = int((tmp_path / "child").read_text())
    assert not alive_after_grace(child)


def test_hooks_parse_and_reject_bad_settings(monkeypatch):
    assert fault_for("sud.quick.c.s0-ab", parse_faults('{"sud.quick.*": "crash"}')) == "crash"
    assert fault_for("other.quick.c.s0-ab", parse_faults('{"sud.quick.*": "crash"}')) is None
    with pytest.raises(SchedulerError, match="FSEARCH_FAULTS"):
        parse_faults('{"x": "explode"}')
    with pytest.raises(SchedulerError, match="FSEARCH_FAULTS"):
        parse_faults("[1]")
    k = KillPoints("record:2,claim")
    assert k.targets == {"record": 2, "claim": 1}
    assert [k.due("record") for _ in range(3)] == [False, True, False]
    for bad in ("nowhere:1", "record:0", "record:x"):
        with pytest.raises(SchedulerError, match="FSEARCH_KILL_AT"):
            KillPoints(bad)
    monkeypatch.setenv("FSEARCH_WORKER_CMD", "python3 -u my_worker.py")
    assert worker_command() == ["python3", "-u", "my_worker.py"]
    assert worker_command(["a", "b"]) == ["a", "b"]
    monkeypatch.delenv("FSEARCH_WORKER_CMD")
    assert worker_command()[1:] == ["-m", "worker"]


def test_rich_display_renders_the_live_table(write_spec, fake_env, round_runner):
    from rich.console import Console

    from orchestrator.progress import RichDisplay

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=140, color_system=None)
    display = RichDisplay(console)
    round_runner(write_spec(), display=display)
    out = buf.getvalue()
    assert "round r" in out and "seedcheck" in out and "7/7 planned runs done, round finished" in out
    assert "scalar_l2_trainable s0: ok hole_acc=" in out


def test_status_rows_show_the_current_run_and_an_eta(make_record):
    from orchestrator.progress import Active, format_table, status_rows

    done = [make_record(i, task="t", stage="quick", wall_s=10.0, steps=10, budget_steps=10) for i in range(2)]
    active = Active("t", "quick", "c9", 0, 1, {"step": 4, "steps": 10, "loss": 1.2345, "eta_s": 6.0}, time.time())
    (row,) = status_rows(done, None, active, {"quick": 10})
    assert (row.done, row.running, row.current) == (2, 1, "c9 s0 (attempt 1) step 4/10 loss 1.2345")
    assert row.eta_s == pytest.approx(6.0)

    class Stage:  # the planner's StageProgress: 5 runs, 2 done, 1 running -> 2 to start, 10 steps at 1 s/step
        task, stage, state, total, done, failed, pruned = "t", "quick", "running", 5, 2, 0, 1

    class Plan:
        stages = [Stage()]

    (row,) = status_rows(done, Plan(), active, {"quick": 10})
    assert row.eta_s == pytest.approx(2 * 10 * 1.0 + 6.0) and row.total == 5 and row.pruned == 1
    assert "2/5" in format_table([row]) and "26s" in format_table([row])


def test_status_is_read_only(write_spec, fake_env, round_runner, tmp_path):
    from orchestrator.progress import round_status

    round_runner(write_spec())
    rd = tmp_path / "results" / "r"

    def snapshot():  # every file but SQLite's own -wal/-shm bookkeeping
        return {str(p): p.stat().st_mtime_ns for p in rd.rglob("*")
                if p.is_file() and not p.name.endswith(("-shm", "-wal"))}

    before = snapshot()
    st = round_status(rd)
    assert "no scheduler running; 7 runs recorded; study: 6 complete, 1 pruned" in st.header
    assert [(r.stage, r.state, r.done, r.total) for r in st.rows] == [("quick", "complete", 3, 3),
                                                                       ("seedcheck", "complete", 4, 4)]
    assert snapshot() == before


def test_a_worker_command_that_cannot_start_is_one_clear_error(write_spec, fake_env, round_runner, tmp_path,
                                                                fake_worker_cmd):
    fake_env.setenv("FSEARCH_WORKER_CMD", str(tmp_path / "no-such-worker"))
    with pytest.raises(SchedulerError, match="the worker command cannot start"):
        round_runner(write_spec())
    # the claimed trial is adopted (not duplicated) once the worker command is fixed
    fake_env.setenv("FSEARCH_WORKER_CMD", fake_worker_cmd)
    _, records = round_runner(write_spec())
    assert len(load_trials(tmp_path / "results" / "r")) == len(records) == 7


def test_workers_get_a_bytecode_cache_only_where_torch_is_installed_read_only_without_one(tmp_path, monkeypatch):
    import importlib.machinery
    import importlib.util
    import sys

    from orchestrator import scheduler

    pkg = tmp_path / "site" / "torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    spec = importlib.machinery.ModuleSpec("torch", None, is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "torch" else None)
    writable = {"yes": True}
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: writable["yes"] if str(p) == str(pkg) else real_access(p, mode))
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    assert "PYTHONPYCACHEPREFIX" not in scheduler.worker_environment()  # a writable install caches its own bytecode
    writable["yes"] = False
    assert scheduler.worker_environment()["PYTHONPYCACHEPREFIX"] == str(tmp_path / "cache" / "fsearch" / "pycache")
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path / "mine"))
    assert scheduler.worker_environment()["PYTHONPYCACHEPREFIX"] == str(tmp_path / "mine")  # the user's choice stays
    monkeypatch.delenv("PYTHONPYCACHEPREFIX")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / f"__init__.{sys.implementation.cache_tag}.pyc").write_bytes(b"")
    assert "PYTHONPYCACHEPREFIX" not in scheduler.worker_environment()  # shipped bytecode is used as it is
