"""Several workers on one round (PostgreSQL on loopback, the fake worker): `fsearch worker` processes on two
"hosts" (two results folders) complete the demo round with no unit run twice, stage barriers held and records equal
to a serial round's; a worker SIGKILLed mid-run has its unit taken over after its heartbeat timeout and recorded once;
a worker frozen past its timeout notices, when it wakes, that its unit was taken over and records nothing;
`fsearch round --workers 3` runs a pool, refuses a second coordinator, lets extra workers join, survives a worker's
death. SQLite with several workers is refused with one line."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from sqlalchemy import create_engine

from orchestrator.claims import DONE, RoundClaims
from orchestrator.records import Ledger
from orchestrator.study import driver_url

REPO = Path(__file__).resolve().parents[2]
TIMING_FIELDS = ("wall_s", "tokens_per_s", "finished_at", "run_dir", "attempt", "peak_mem_bytes",
                 "first_step_s")
KILLED = -signal.SIGKILL
FAST_CLAIMS = ["--heartbeat-s", "0.2", "--stale-after-s", "2", "--wait-s", "0.1"]
STALE_AFTER_S = 2.0
FOREIGN = "otherhost:4242:00000000"  # a worker id of another machine: only its heartbeat tells whether it lives
STAGE_RANK = {"quick": 0, "med": 1, "long": 2, "seedcheck": 3}

# 5 units: quick baseline, l1 (promoted), l2 (pruned); med baseline, l1
SMALL = {"stages!": {"quick": {"steps": 4, "eval_every": 2, "seeds": [0]}, "med": {"steps": 6, "eval_every": 3}},
         "tasks": {"sud": {"batch": 4, "candidates": ["scalar_l1_trainable", "scalar_l2_trainable"]}}}


def comparable(records):
    return sorted(({k: v for k, v in r.model_dump().items() if k not in TIMING_FIELDS} for r in records),
                  key=lambda d: d["run_key"])


def demo_spec_data(output: Path) -> dict:
    data = yaml.safe_load((REPO / "studies" / "demo.yaml").read_text())
    data.update(round="r", output=str(output))
    return data


def worker(cli_environ, pg_url: str, spec: Path, results: Path, *extra: str, env: dict | None = None):
    argv = [sys.executable, "-m", "orchestrator.cli", "worker", "--round", "r", "--storage", pg_url,
            "--spec", str(spec), "--results", str(results), *FAST_CLAIMS, *extra]
    return subprocess.Popen(argv, cwd=REPO, env=cli_environ(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(procs, timeout: float = 120) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
        out.append((p.returncode, o, e))
    return out


def claims_of(pg_url: str) -> RoundClaims:
    return RoundClaims(create_engine(driver_url(pg_url)), "r")


def trials_by_key(pg_url: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for t in optuna.load_study(study_name="r", storage=driver_url(pg_url)).trials:
        out.setdefault(t.user_attrs["run_key"], []).append(t)
    return out


def started_attempts(results_dirs: list[Path], run_key: str) -> list[Path]:
    """Attempt folders in which a worker process started (the fake worker writes config.json first thing)."""
    return [d for root in results_dirs for d in sorted((root / "r" / "runs" / run_key).glob("attempt-*"))
            if (d / "config.json").exists()]


def assert_barriers(stored, claim_rows) -> None:
    """No unit was claimed before the records it depends on: its task's earlier stages, and (candidates) its matched
    baseline. Claim and record times are the database's clock."""
    claimed = {c.run_key: c.claimed_at for c in claim_rows}
    recorded = {s.record.run_key: s.recorded_at for s in stored}
    for s in stored:
        r = s.record
        earlier = [x.recorded_at for x in stored
                   if x.record.task == r.task and STAGE_RANK[x.record.stage] < STAGE_RANK[r.stage]]
        assert all(claimed[r.run_key] >= t for t in earlier), f"{r.run_key} claimed before its previous stage ended"
        if r.baseline_key is not None:
            assert claimed[r.run_key] >= recorded[r.baseline_key], f"{r.run_key} claimed before its baseline"


# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.postgres
def test_three_workers_on_two_hosts_complete_the_demo_round(pg_url, tmp_path, write_spec, fake_env, round_runner,
                                                            cli_environ):
    serial_spec = write_spec(demo_spec_data(tmp_path / "serial"), name="serial.yaml", base={})
    _, serial = round_runner(serial_spec)  # the reference: one scheduler, SQLite
    spec = write_spec({**demo_spec_data(tmp_path / "unused"), "storage": pg_url}, name="shared.yaml", base={})
    host_a, host_b = tmp_path / "host_a", tmp_path / "host_b"
    procs = [worker(cli_environ, pg_url, spec, host_a), worker(cli_environ, pg_url, spec, host_a),
             worker(cli_environ, pg_url, spec, host_b)]
    results = finish(procs)
    for code, out, err in results:
        assert code == 0, err[-3000:]
        assert "has no work left" in out

    claims = claims_of(pg_url)
    stored = claims.stored_records()
    records = [s.record for s in stored]
    assert comparable(records) == comparable(serial)
    assert len({r.run_key for r in records}) == len(records) == len(serial)
    assert len({s.worker for s in stored}) >= 2, "the work was not shared"
    # no unit run twice: one started attempt per run, over both hosts; one claim, never taken over
    for r in records:
        assert [d.name for d in started_attempts([host_a, host_b], r.run_key)] == ["attempt-0"], r.run_key
    _, rows = claims.claims()
    assert sorted(c.run_key for c in rows) == sorted(r.run_key for r in records)
    assert all(c.state == DONE and c.steals == 0 for c in rows)
    assert_barriers(stored, rows)
    # one finished trial per run, told from its record
    trials = trials_by_key(pg_url)
    assert sorted(trials) == sorted(r.run_key for r in records)
    assert all(len(ts) == 1 and ts[0].state != TrialState.RUNNING for ts in trials.values())
    # each host's records.jsonl mirrors the database (every worker synced it on exit); its round folder keeps the
    # storage URL the workers were given (for status/export/report)
    for host in (host_a, host_b):
        assert json.loads((host / "r" / "storage.json").read_text()) == {"url": pg_url, "password_removed": False}
        mirror = Ledger(host / "r" / "records.jsonl").read()
        assert sorted(r.run_key for r in mirror) == sorted(r.run_key for r in records)
        assert comparable(mirror) == comparable(records)


@pytest.mark.postgres
def test_a_worker_killed_mid_run_is_taken_over_after_its_timeout_and_recorded_once(pg_url, tmp_path, write_spec,
                                                                                   fake_env, round_runner,
                                                                                   cli_environ):
    _, serial = round_runner(write_spec({**SMALL, "output": str(tmp_path / "serial")}, name="serial.yaml"))
    spec = write_spec({**SMALL, "storage": pg_url}, name="shared.yaml")
    host = tmp_path / "host"
    # the doomed worker looks like one of another machine, so only the heartbeat timeout can free its unit
    doomed = worker(cli_environ, pg_url, spec, host, "--worker-id", FOREIGN,
                    env={"FSEARCH_KILL_AT": "run:1", "FAKE_WORKER_STEP_S": "0.3"})
    (code, _, err), = finish([doomed])
    assert code == KILLED, err[-2000:]
    killed_at = time.time()
    claims = claims_of(pg_url)
    _, (held,) = claims.claims()
    assert held.worker == FOREIGN and held.state == "running"
    others = [worker(cli_environ, pg_url, spec, host), worker(cli_environ, pg_url, spec, host)]
    for code, out, err in finish(others):
        assert code == 0, err[-3000:]
    stored = claims.stored_records()
    records = [s.record for s in stored]
    assert comparable(records) == comparable(serial)
    _, rows = claims.claims()
    (taken,) = [c for c in rows if c.run_key == held.run_key]
    assert (taken.steals, taken.previous_worker, taken.state) == (1, FOREIGN, DONE)
    assert taken.claimed_at >= held.heartbeat_at + STALE_AFTER_S  # not before the dead worker's timeout
    assert time.time() - killed_at >= STALE_AFTER_S * 0.5
    rec = next(r for r in records if r.run_key == held.run_key)
    assert rec.attempt == 1 and rec.status == "ok"
    attempts = started_attempts([host], held.run_key)
    assert [d.name for d in attempts] == ["attempt-0", "attempt-1"]
    assert not (attempts[0] / "result.json").exists()  # the killed worker's run died with it
    pid = json.loads((attempts[0] / "config.json").read_text())["pid"]
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1][:3]
    assert all(len(started_attempts([host], r.run_key)) == 1 for r in records if r.run_key != held.run_key)
    (trial,) = trials_by_key(pg_url)[held.run_key]
    assert trial.state == TrialState.COMPLETE
    assert [h["outcome"] for h in trial.user_attrs["attempts"]] == ["lost", "ok"]
    assert all(len(ts) == 1 for ts in trials_by_key(pg_url).values())
    assert Ledger(host / "r" / "records.jsonl").read() == records


@pytest.mark.postgres
def test_a_frozen_worker_that_wakes_after_losing_its_unit_records_nothing(pg_url, tmp_path, write_spec, fake_env,
                                                                          cli_environ):
    spec = write_spec({**SMALL, "storage": pg_url}, name="shared.yaml")
    host = tmp_path / "host"
    frozen = worker(cli_environ, pg_url, spec, host, env={"FAKE_WORKER_STEP_S": "0.3"})
    try:
        deadline = time.time() + 60
        while not list((host / "r" / "runs").glob("*/attempt-0/progress.json")) and time.time() < deadline:
            time.sleep(0.05)
        frozen.send_signal(signal.SIGSTOP)  # alive but silent: its run goes on, its heartbeats stop
        claims = claims_of(pg_url)
        _, (held,) = claims.claims()
        rescuer = worker(cli_environ, pg_url, spec, host)
        (code, out, err), = finish([rescuer])
        assert code == 0, err[-3000:]
    finally:
        frozen.send_signal(signal.SIGCONT)
    (code, out, err), = finish([frozen])
    assert code == 0, err[-3000:]
    assert f"{held.run_key}: another worker took this unit over" in out
    stored = claims.stored_records()
    assert len(stored) == 5 and len({s.record.run_key for s in stored}) == 5
    assert {s.worker for s in stored} == {next(c.worker for c in claims.claims()[1] if c.run_key == held.run_key)}
    attempts = started_attempts([host], held.run_key)
    assert [d.name for d in attempts] == ["attempt-0", "attempt-1"]
    rec = next(s.record for s in stored if s.record.run_key == held.run_key)
    assert rec.attempt == 1 and rec.run_dir == str(attempts[1])
    assert Ledger(host / "r" / "records.jsonl").read() == [s.record for s in stored]
    (trial,) = trials_by_key(pg_url)[held.run_key]
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["attempt"] == 1


@pytest.mark.postgres
def test_round_with_a_pool_of_three_workers(pg_url, tmp_path, write_spec, cli_environ, fsearch_cli):
    spec = write_spec({**SMALL, "storage": pg_url, "tasks": {"sud": {"candidates": [
        "scalar_l1_trainable", "scalar_l2_trainable", "scalar_l3_trainable", "read_twice"]}}})
    rd = tmp_path / "results" / "r"
    coord = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "round", "--spec", str(spec), "--workers", "3",
                              "--no-report", "--heartbeat-s", "0.2", "--stale-after-s", "30"], cwd=REPO,
                             env=cli_environ({"FAKE_WORKER_STEP_S": "0.1"}), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        claims = claims_of(pg_url)
        deadline = time.time() + 60
        running: list = []
        while time.time() < deadline and not running:
            time.sleep(0.05)
            try:
                running = [c for c in claims.claims()[1] if c.state == "running"]
            except Exception:  # noqa: BLE001 - the tables do not exist yet
                pass
        assert running, "no worker claimed anything"
        # kill a pool worker mid-run, at once (a later kill can find it between units on a loaded machine): a worker of
        # this machine whose process is gone is taken over at once
        victim = int(running[0].worker.split(":")[1])
        subprocess.run(["kill", "-9", str(victim)], check=True)
        second = fsearch_cli("round", "--spec", str(spec), "--workers", "3", "--no-report")
        assert second.returncode == 2 and "already being run by another scheduler" in second.stderr
        # the round lock does not stop a worker; given only --round and --storage, it reads the spec from the study
        joined = fsearch_cli("worker", "--round", "r", "--storage", pg_url, "--results", str(tmp_path / "results"),
                             *FAST_CLAIMS, env={"FAKE_WORKER_STEP_S": "0.1"})
        assert joined.returncode == 0, joined.stderr[-2000:]
        assert "in the round" in joined.stdout and "has no work left" in joined.stdout
        out, err = coord.communicate(timeout=120)
    finally:
        if coord.poll() is None:
            coord.kill()
            coord.communicate()
    assert coord.returncode == 0, err[-3000:]
    assert "note: 1 worker(s) failed, the others finished the round" in out
    stored = claims.stored_records()
    keys = [s.record.run_key for s in stored]
    assert len(keys) == len(set(keys)) == 9  # quick: baseline + 4; med: baseline + l1, l3, read_twice
    assert Ledger(rd / "records.jsonl").read() == [s.record for s in stored]
    _, rows = claims.claims()
    assert all(c.state == DONE for c in rows) and sum(c.steals for c in rows) >= 1, rows
    for k in keys:  # a second start only where a unit was taken over from the killed worker
        steals = next(c.steals for c in rows if c.run_key == k)
        assert 1 <= len(started_attempts([tmp_path / "results"], k)) <= 1 + steals, k
    logs = sorted(p.name for p in (rd / "workers").iterdir())
    assert [n for n in logs if n.startswith("worker-")] == ["worker-0.log", "worker-1.log", "worker-2.log"]
    # besides: what each scheduler's warm worker process printed outside its runs, a file per scheduler process (the
    # three pool workers and the joined worker, if it ran anything)
    warm = [n for n in logs if not n.startswith("worker-")]
    assert 1 <= len(warm) <= 4 and all(re.fullmatch(r"warm-worker\.\d+\.log", n) for n in warm), logs
    assert not (rd / "scheduler.pid").exists()


def test_several_workers_on_sqlite_are_refused(write_spec, fsearch_cli, tmp_path):
    spec = write_spec()
    p = fsearch_cli("round", "--spec", str(spec), "--workers", "2", "--no-report")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "error: --workers 2 needs a PostgreSQL storage" in p.stderr and "SQLite serves a single" in p.stderr
    p = fsearch_cli("worker", "--round", "r", "--storage", f"sqlite:///{tmp_path / 'study.db'}")
    assert p.returncode == 2 and "error: fsearch worker needs a PostgreSQL storage" in p.stderr, p.stderr
    p = fsearch_cli("round", "--spec", str(spec), "--workers", "0")
    assert p.returncode == 2 and "--workers 0: must be at least 1" in p.stderr
    assert not (tmp_path / "results" / "r" / "records.jsonl").exists()


class Messages:
    """A display that keeps the scheduler's messages."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)

    def __getattr__(self, name: str):
        return lambda *a, **k: None


@pytest.mark.postgres
def test_two_workers_run_one_batch_probe_for_the_round(pg_url, tmp_path, write_spec, fake_env):
    import threading

    from orchestrator.scheduler import SharedScheduler
    from orchestrator.spec import load_spec

    fake_env.setenv("FAKE_PROBE_MAX", "4")
    spec = load_spec(write_spec({**SMALL, "storage": pg_url, "defaults": {"device": "auto",
                                                                          "probe": {"micro_batches": [8, 4]}},
                                 "tasks": {"sud": {"batch": "auto"}}}))
    displays = [Messages(), Messages()]
    workers = [SharedScheduler(spec, display=d, worker_id=f"w{i}:{i}:x", heartbeat_s=0.2, stale_after_s=5,
                               wait_s=0.05, poll_s=0.02, term_grace_s=1.0) for i, d in enumerate(displays)]
    out: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            out[i] = workers[i].run()
        except BaseException as e:  # noqa: BLE001 - reported below
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(isinstance(out[i], list) for i in range(2)), out
    probes = [ln for d in displays for ln in d.lines if "batch probe over micro-batches" in ln]
    assert len(probes) == 1, [d.lines for d in displays]
    records = claims_of(pg_url).records()
    assert len(records) == 5 and {(r.batch_size, r.micro_batch) for r in records} == {(4, 4)}
    assert optuna.load_study(study_name="r", storage=driver_url(pg_url)).user_attrs["probe.sud"]["micro_batch"] == 4
    assert json.loads((tmp_path / "results" / "r" / "probe" / "sud.json").read_text())["micro_batch"] == 4


@pytest.mark.postgres
def test_a_worker_killed_between_record_and_tell_leaves_one_record_and_a_told_trial(pg_url, tmp_path, write_spec,
                                                                                    fake_env, round_runner,
                                                                                    cli_environ):
    spec = write_spec({**SMALL, "storage": pg_url})
    p = worker(cli_environ, pg_url, spec, tmp_path / "results", "--worker-id", FOREIGN,
               env={"FSEARCH_KILL_AT": "record:1"})
    (code, _, err), = finish([p])
    assert code == KILLED, err[-2000:]
    claims = claims_of(pg_url)
    (first,) = claims.records()
    (t,) = trials_by_key(pg_url)[first.run_key]
    assert t.state == TrialState.RUNNING  # recorded in the database, trial not told
    _, records = round_runner(spec)  # another worker (here a coordinator in this process) finishes the round
    assert len(records) == 5 and records[0] == first
    trials = trials_by_key(pg_url)
    assert all(len(ts) == 1 and ts[0].state != TrialState.RUNNING for ts in trials.values())
    assert trials[first.run_key][0].user_attrs["decision"] == first.decision
    assert Ledger(tmp_path / "results" / "r" / "records.jsonl").read() == records


def test_ledger_append_missing_keeps_order_skips_known_and_drops_a_torn_tail(tmp_path, make_record):
    ledger = Ledger(tmp_path / "records.jsonl")
    a, b, c = (make_record(i, run_key=f"k{i}") for i in range(3))
    assert ledger.append_missing([a]) == [a]
    ledger.write_torn(b)
    assert ledger.append_missing([a, c, b, c]) == [c, b]
    assert ledger.read() == [a, c, b] and ledger.append_missing([b, a]) == []
    assert (tmp_path / "records.jsonl").read_text().count("\n") == 3


@pytest.mark.slow
@pytest.mark.postgres
def test_three_real_workers_complete_the_demo_round(pg_url, tmp_path, write_spec, cli_environ):
    """The demo round with the real worker (CPU): three workers on PostgreSQL give a serial round's records."""

    def real_env() -> dict:
        env = cli_environ()
        env.pop("FSEARCH_WORKER_CMD", None)
        return env

    serial_spec = write_spec(demo_spec_data(tmp_path / "serial"), name="serial.yaml", base={})
    p = subprocess.run([sys.executable, "-m", "orchestrator.cli", "round", "--spec", str(serial_spec), "--no-report"],
                       cwd=REPO, env=real_env(), capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]
    serial = Ledger(tmp_path / "serial" / "r" / "records.jsonl").read()
    spec = write_spec({**demo_spec_data(tmp_path / "unused"), "storage": pg_url}, name="shared.yaml", base={})
    argv = [sys.executable, "-m", "orchestrator.cli", "worker", "--round", "r", "--storage", pg_url, "--spec",
            str(spec), "--results", str(tmp_path / "host"), "--heartbeat-s", "2", "--stale-after-s", "60"]
    procs = [subprocess.Popen(argv, cwd=REPO, env=real_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    for code, _, err in finish(procs, timeout=3600):
        assert code == 0, err[-3000:]
    stored = claims_of(pg_url).stored_records()
    assert comparable([s.record for s in stored]) == comparable(serial)
    assert len({s.worker for s in stored}) == 3
    for s in stored:
        assert [d.name for d in started_attempts([tmp_path / "host"], s.record.run_key)] == ["attempt-0"]


def test_claims_logic_on_sqlite_in_one_process(tmp_path, make_record):
    """The claim SQL is dialect-neutral (the database clock included); fsearch still refuses SQLite for several
    processes, since SQLite has no row locks."""
    engine = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    a, b = RoundClaims(engine, "r", FOREIGN, stale_after_s=0.3), RoundClaims(engine, "r", "w:2:x")
    a.ensure_tables()
    lease = a.try_claim("k")
    assert lease is not None and b.try_claim("k") is None and "k" in b.busy_keys()
    time.sleep(0.4)
    taken = b.try_claim("k")
    assert taken is not None and taken.stolen_from == FOREIGN and not a.beat(lease)
    rec = make_record(0, run_key="k")
    assert not a.commit_record(lease, rec) and b.commit_record(taken, rec)
    assert b.records() == [rec] and a.try_claim("k") is None
