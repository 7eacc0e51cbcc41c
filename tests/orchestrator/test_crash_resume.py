"""Crash safety: the scheduler is SIGKILLed at chosen moments (FSEARCH_KILL_AT), then the same command is run again.
The final records must equal an uninterrupted round's (timings, paths and attempts aside): none lost, none duplicated;
the study has exactly one finished trial per run and no RUNNING trial."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from orchestrator.records import Ledger
from orchestrator.study import default_storage_url, trial_state_for

TIMING_FIELDS = ("wall_s", "tokens_per_s", "finished_at", "run_dir", "attempt", "peak_mem_bytes",
                 "first_step_s")
KILLED = -signal.SIGKILL

CRASH_SPEC = {
    "stages!": {"quick": {"steps": 4, "eval_every": 2, "seeds": [0]}, "med": {"steps": 6, "eval_every": 3}},
    "tasks": {"sud": {"batch": 4, "candidates": ["scalar_l1_trainable", "scalar_l2_trainable"]}},
}  # 5 runs: quick baseline, l1 (promoted), l2 (pruned); med baseline, l1
# the same round with `batch: auto`: the probe picks 4 (FAKE_PROBE_MAX), so its runs are the reference's runs
# (compile pinned off: with device auto, compile auto would key its runs as graph replays, the step a GPU would run)
PROBE_SPEC = {**CRASH_SPEC, "defaults": {"device": "auto", "compile": "off", "probe": {"micro_batches": [8, 4]}},
              "tasks": {"sud": {**CRASH_SPEC["tasks"]["sud"], "batch": "auto"}}}
SLOW = {"FAKE_WORKER_STEP_S": "0.3"}  # a run long enough to be killed in the middle

# Each chain runs `fsearch round` once per (kill point, extra env), each killed there, then once more to the end.
# Kill counts are per scheduler process (FSEARCH_KILL_AT="point:n": the n-th visit of that process).
CHAINS = {
    # the ledger side: claim, a torn record line, record without tell, a kill between runs, outcome not recorded
    "ledger": (CRASH_SPEC, [("claim:1", {}), ("torn_record:1", {}), ("record:1", {}), ("tell:1", {}),
                            ("outcome:1", {})]),
    # the process side: worker just spawned, worker mid-run, stage transition, a claim in the next stage
    "process": (CRASH_SPEC, [("spawn:1", {}), ("run:1", SLOW), ("stage:1", {}), ("claim:2", {})]),
    # the batch probe's result written, not yet stored in the study
    "probe": (PROBE_SPEC, [("probe:1", {})]),
    # an uninterrupted round: the comparison
    "reference": (CRASH_SPEC, []),
}
BASE_ENV = {"FAKE_PROBE_MAX": "4"}


def comparable(records):
    return [{k: v for k, v in r.model_dump().items() if k not in TIMING_FIELDS} for r in records]


def run_chain(fsearch, spec_path: Path, kills: list[tuple[str, dict]]) -> list[tuple[str, int, str]]:
    """Run `fsearch round` once per kill setting, then once more without; returns (setting, returncode, stderr)."""
    out = []
    for kill, env in [*kills, (None, {})]:
        p = fsearch("round", "--spec", str(spec_path), "--no-report",
                    env={**BASE_ENV, **env, **({"FSEARCH_KILL_AT": kill} if kill else {})})
        out.append((kill or "-", p.returncode, p.stderr[-2000:]))
    return out


def test_kill_anywhere_then_resume_gives_the_uninterrupted_records(tmp_path, write_spec, fsearch_cli):
    specs = {n: write_spec({**spec, "output": str(tmp_path / n)}, name=f"{n}.yaml") for n, (spec, _) in CHAINS.items()}
    with ThreadPoolExecutor(max_workers=len(CHAINS)) as pool:
        futures = {n: pool.submit(run_chain, fsearch_cli, specs[n], kills) for n, (_, kills) in CHAINS.items()}
        results = {n: f.result() for n, f in futures.items()}

    reference = Ledger(tmp_path / "reference" / "r" / "records.jsonl").read()
    assert [(r.stage, r.candidate, r.batch_size) for r in reference] == [
        ("quick", "baseline", 4), ("quick", "scalar_l1_trainable", 4), ("quick", "scalar_l2_trainable", 4),
        ("med", "baseline", 4), ("med", "scalar_l1_trainable", 4)]
    for name, chain in results.items():
        *killed, final = chain
        assert all(code == KILLED for _, code, _ in killed), f"{name}: a kill point was not reached: {chain}"
        assert final[1] == 0, f"{name}: the resumed round failed: {final[2]}"
        rd = tmp_path / name / "r"
        records = Ledger(rd / "records.jsonl").read()
        assert comparable(records) == comparable(reference), f"{name}: records differ from the uninterrupted round"
        assert (rd / "records.jsonl").read_text().count("\n") == len(records)  # the torn line is gone
        trials = optuna.load_study(study_name="r", storage=default_storage_url(rd)).trials
        assert not [t.number for t in trials if t.state == TrialState.RUNNING], f"{name}: RUNNING trials left"
        by_key: dict[str, list] = {}
        for t in trials:
            by_key.setdefault(t.user_attrs["run_key"], []).append(t)
        assert sorted(by_key) == sorted(r.run_key for r in records), f"{name}: trials and records differ"
        for r in records:
            assert len(by_key[r.run_key]) == 1, f"{name}: {r.run_key} has {len(by_key[r.run_key])} trials"
            t = by_key[r.run_key][0]
            assert t.state == trial_state_for(r), f"{name}: trial of {r.run_key} is {t.state}"
            assert t.user_attrs["decision"] == r.decision and t.user_attrs["attempt"] == r.attempt

    # the ledger chain: the quick baseline was claimed, torn, rerun and recorded once, in its one trial
    rd = tmp_path / "ledger" / "r"
    base = Ledger(rd / "records.jsonl").read()[0]
    assert base.candidate == "baseline" and base.attempt == 1
    assert sorted(p.name for p in (rd / "runs" / base.run_key).iterdir()) == ["attempt-0", "attempt-1"]
    # the process chain: the worker killed with its scheduler did not linger, and its attempt was redone
    rd = tmp_path / "process" / "r"
    interrupted = [d for d in rd.glob("runs/*/attempt-*") if not (d / "result.json").exists()]
    assert interrupted, "no interrupted attempt"
    for d in interrupted:
        cfg = d / "config.json"
        if cfg.exists():
            pid = json.loads(cfg.read_text())["pid"]
            assert not _alive(pid), f"worker {pid} outlived its scheduler"
    # the probe is not repeated after the kill that followed it
    rd = tmp_path / "probe" / "r"
    assert json.loads((rd / "probe" / "sud.json").read_text())["micro_batch"] == 4
    assert optuna.load_study(study_name="r", storage=default_storage_url(rd)).user_attrs["probe.sud"]["micro_batch"] == 4


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_second_scheduler_exits_2_status_reads_meanwhile_sigterm_then_resume(tmp_path, write_spec, fsearch_cli,
                                                                               cli_environ):
    spec = write_spec(CRASH_SPEC)
    rd = tmp_path / "results" / "r"
    # runs of ~6 s: on a loaded machine the checks below take seconds, and the SIGTERM must still meet a run
    first = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "round", "--spec", str(spec), "--no-report"],
                             cwd=Path(__file__).resolve().parents[2], env=cli_environ({"FAKE_WORKER_STEP_S": "1.5"}),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not list(rd.glob("runs/*/attempt-0/progress.json")) and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        second = fsearch_cli("round", "--spec", str(spec), "--no-report")
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [second.stderr.strip()]
        assert "error: round" in second.stderr and "already being run by another scheduler" in second.stderr
        assert "Traceback" not in second.stderr
        # status from another shell while the round runs: read-only (no lock), sees the run in progress
        status = fsearch_cli("status", str(rd))
        assert status.returncode == 0, status.stderr
        assert f"scheduler running (pid {first.pid})" in status.stdout
        assert any(ln.startswith("sud ") and " running " in ln and " s0" in ln for ln in status.stdout.splitlines())
        assert first.poll() is None
        # SIGTERM: the worker's group is killed, the scheduler says how to resume, exit 130
        running = [d for d in rd.glob("runs/*/attempt-*") if not (d / "result.json").exists()]
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
        assert first.returncode == 130 and "interrupted; run the same command to resume" in err
        for d in running:
            if (d / "config.json").exists():
                assert not _alive(json.loads((d / "config.json").read_text())["pid"])
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    status = fsearch_cli("status", str(rd))
    assert "no scheduler running" in status.stdout and "is RUNNING but no scheduler is: interrupted" in status.stdout
    resumed = fsearch_cli("round", "--spec", str(spec), "--no-report")
    assert resumed.returncode == 0, resumed.stderr
    records = Ledger(rd / "records.jsonl").read()
    assert len(records) == 5 and len({r.run_key for r in records}) == 5
    trials = optuna.load_study(study_name="r", storage=default_storage_url(rd)).trials
    assert len(trials) == 5 and all(t.state != TrialState.RUNNING for t in trials)
