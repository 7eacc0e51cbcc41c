"""`defaults.worker: warm`: one real worker process (`python -m worker --serve`) runs a round's runs one after another.
The oracle is the same round with a worker process per run: the records must be equal, timings aside (each run gets a
fresh model, optimizer, data streams and RNG seeds either way). A run that fails (out of memory, a crash, the time
limit) ends its process, and the next run gets a fresh one."""
from __future__ import annotations

import json
import sys

import pytest

from orchestrator.records import Ledger

pytest.importorskip("torch")

TIMING_FIELDS = ("wall_s", "tokens_per_s", "finished_at", "run_dir", "peak_mem_bytes", "first_step_s")
SPEC = {"stages!": {"quick": {"steps": 4, "eval_every": 2, "seeds": [0]}},
        "defaults": {"lr": {"model": 3.0e-3}, "time_limit_s": 60},
        "tasks": {"sud": {"batch": 4, "candidates": ["scalar_l1_trainable", "scalar_l2_trainable", "read_twice"]}}}


def comparable(records):
    return [{k: v for k, v in r.model_dump().items() if k not in TIMING_FIELDS} for r in records]


def worker_pids(round_dir) -> dict[tuple[str, int], int]:
    """(candidate, attempt) -> the pid of the worker process that ran it."""
    out = {}
    for d in round_dir.glob("runs/*/attempt-*"):
        candidate = d.parent.name.split(".")[2]
        out[(candidate, int(d.name.split("-")[1]))] = int((d / "worker.pid").read_text().split()[0])
    return out


@pytest.mark.slow  # two rounds of four runs on the CPU: ~30 s on the 2-core dev machine
def test_a_warm_worker_gives_the_records_of_a_worker_per_run_and_recovers_from_failures(write_spec, monkeypatch,
                                                                                       tmp_path, round_runner):
    monkeypatch.setenv("FSEARCH_WORKER_CMD", f"{sys.executable} -m worker")
    monkeypatch.delenv("FSEARCH_KILL_AT", raising=False)
    # l2 runs out of memory at micro-batch 4 (the retry at 2 passes); read_twice crashes on its first attempt
    monkeypatch.setenv("FSEARCH_FAULTS", json.dumps({"*.scalar_l2_trainable.*": "oom", "*.read_twice.*": "crash_once"}))
    fresh = write_spec({**SPEC, "output": str(tmp_path / "fresh"),
                        "defaults": {**SPEC["defaults"], "worker": "fresh"}}, name="fresh.yaml")
    warm = write_spec({**SPEC, "output": str(tmp_path / "warm")}, name="warm.yaml")  # the default
    sched, fresh_records = round_runner(fresh)
    sched_w, warm_records = round_runner(warm)
    assert [(r.candidate, r.status, r.attempt) for r in warm_records] == [
        ("baseline", "ok", 0), ("scalar_l1_trainable", "ok", 0), ("scalar_l2_trainable", "ok", 1),
        ("read_twice", "ok", 1)]
    assert comparable(warm_records) == comparable(fresh_records)
    assert all(r.first_step_s is not None and 0 < r.first_step_s < r.wall_s + 30 for r in warm_records)
    # baseline, l1 and l2's attempt 0 ran in one process (l2's OOM ended it); l2's retry and read_twice's crashed
    # attempt in the next; read_twice's retry in a third
    pids = worker_pids(tmp_path / "warm" / "r")
    first, second, third = (pids["baseline", 0], pids["scalar_l2_trainable", 1], pids["read_twice", 1])
    assert pids == {("baseline", 0): first, ("scalar_l1_trainable", 0): first, ("scalar_l2_trainable", 0): first,
                    ("scalar_l2_trainable", 1): second, ("read_twice", 0): second, ("read_twice", 1): third}
    assert len({first, second, third}) == 3
    assert len(set(worker_pids(tmp_path / "fresh" / "r").values())) == 6
    # each run's output went to its own log; the worker is gone when the round ends
    (crashed,) = (tmp_path / "warm" / "r" / "runs").glob("*read_twice*/attempt-0")
    assert "injected crash" in (crashed / "worker.log").read_text()
    assert sched_w.warm is None
    assert Ledger(tmp_path / "warm" / "r" / "records.jsonl").read() == warm_records


def test_a_warm_worker_past_its_time_limit_is_stopped_and_the_next_run_gets_a_fresh_one(tmp_path):
    """The process side alone, with a stand-in for the worker: a run that never reports is stopped at its time limit
    (a negative code, as for a fresh worker), and the next run starts a new process; so does the run after a failed
    one, and the run after one whose process said it retires (GPU memory left allocated)."""
    from orchestrator.processes import WarmWorker

    script = tmp_path / "serve.py"
    script.write_text(
        "import sys, time\n"
        "print('a library talking on stdout', flush=True)\n"
        "for line in sys.stdin:\n"
        "    run, _, log = line.rstrip('\\n').partition('\\t')\n"
        "    open(log, 'a').write(run + '\\n')\n"
        "    if run.endswith('hang'):\n"
        "        time.sleep(60)\n"
        "    if run.endswith('leak'):\n"
        "        print('fsearch-exit 0 retire', flush=True)\n"
        "        sys.exit(0)\n"
        "    print('fsearch-exit', 3 if run.endswith('fail') else 0, flush=True)\n")
    w = WarmWorker([sys.executable, str(script)], tmp_path / "warm.log")
    codes, pids = [], []
    for name in ("a", "b", "hang", "c", "fail", "d", "leak", "e"):
        run = w.start(tmp_path / name, tmp_path / f"{name}.log")
        pids.append(run.pid)
        codes.append((run.wait(time_limit_s=2.0, poll_s=0.05, term_grace_s=0.5), run.timed_out))
    w.close()
    assert codes == [(0, False), (0, False), (-15, True), (0, False), (3, False), (0, False), (0, False), (0, False)]
    # a new process after the hang, after the failure, and after the run that left GPU memory behind ("retire")
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] != pids[5] == pids[6] != pids[7]
    assert (tmp_path / "c.log").read_text() == str(tmp_path / "c") + "\n"
    assert w.proc is None and w.started_processes == 4


def test_a_leftover_worker_is_recognised_by_pid_and_start_time_whatever_its_command_line(tmp_path):
    """kill_leftover_worker (a resumed or taking-over scheduler, before an attempt runs again) kills the process group
    that worker.pid names when that process started when the file says: a warm worker's process, whose command line
    names no run file, included. A live process under the same pid but of another start time is left alone, and an old
    file with a pid alone still needs the run file on the process's command line."""
    import subprocess
    import time

    from orchestrator.processes import kill_leftover_worker, process_start_ticks, worker_pid_line

    def sleeper(*argv: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv], start_new_session=True)

    def gone(p: subprocess.Popen) -> bool:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return False
        return True

    attempt = tmp_path / "attempt-0"
    attempt.mkdir()
    warm = sleeper("--serve")  # a warm worker: nothing of this attempt on its command line
    other = sleeper()
    try:
        assert process_start_ticks(warm.pid) is not None and process_start_ticks(2 ** 30) is None
        # another start time under that pid: not this attempt's worker (the pid went to another process)
        (attempt / "worker.pid").write_text(f"{other.pid} {process_start_ticks(other.pid) + 1}\n")
        kill_leftover_worker(attempt)
        # an old pid file (pid alone): the command line must name the run file
        (attempt / "worker.pid").write_text(f"{warm.pid}\n")
        kill_leftover_worker(attempt)
        time.sleep(0.3)
        assert warm.poll() is None and other.poll() is None
        (attempt / "worker.pid").write_text(worker_pid_line(warm.pid))
        kill_leftover_worker(attempt)
        assert gone(warm) and warm.returncode == -9
        assert other.poll() is None
        fresh = sleeper(str(attempt / "run.json"))  # a worker per run, named by an old pid file
        (attempt / "worker.pid").write_text(f"{fresh.pid}\n")
        kill_leftover_worker(attempt)
        assert gone(fresh) and fresh.returncode == -9
        (attempt / "worker.pid").write_text("not a pid\n")
        kill_leftover_worker(attempt)  # unreadable: nothing to do, no error
    finally:
        for p in (warm, other):
            p.kill()
            p.wait()
