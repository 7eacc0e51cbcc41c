"""The round loop: ask the planner, run one unit in a worker subprocess, record it, repeat. Resume = run it again.

Per run (one study trial, one ledger record):
    claim trial (RUNNING, user attrs run_key/attempt/micro_batch)  -- or adopt the RUNNING trial a killed scheduler left
    for each attempt:  set trial attrs (attempt, micro_batch) -> write attempt-<n>/run.json -> spawn the worker
                       (own process group, dies with the scheduler, time limit) -> wait -> classify
                       -> append to the trial's attempt history -> retry (oom: halve the micro-batch, same effective
                       batch; crash/timeout: up to `retries`) or stop (ok, diverged, data, config, retries spent)
    append the record to records.jsonl (flush + fsync)  -> tell the trial (user attrs, state, value)

The ledger is the truth: on start `RoundStudy.reconcile` tells RUNNING trials whose run has a record, keeps the
others for adoption, and mirrors records that have no trial. The planner never returns a recorded run, so a finished
run is never rerun and never recorded twice. A trial left RUNNING whose run the planner no longer returns (the spec
changed) is failed when the round ends, so a finished round has no RUNNING trial.

Several workers (PostgreSQL storage; `scheduler_for` picks the class from the storage URL):
    SharedScheduler   one worker of a round (`fsearch worker`; `fsearch round --storage postgresql://...` runs one in
                      process): the same run steps, but each unit is first claimed in the database (orchestrator.claims:
                      row-locked, heartbeat thread, takeover after the owner's timeout), its record committed to the
                      database while the claim is held (the database is the truth; records.jsonl is each host's
                      mirror), and the trial a dead worker left RUNNING adopted by the unit's next owner.
    WorkerPool        `fsearch round --workers N`: N `fsearch worker` processes on this host, one device each.
SQLite serves one scheduler: several workers on it are refused (orchestrator.study.require_shared_storage).

Test hooks (environment):
  FSEARCH_WORKER_CMD  the worker command (shlex-split; the run file is appended), default `python -m worker`
  FSEARCH_FAULTS      JSON {"<fnmatch pattern on run_key>": "<fault>"} -> RunConfig.fault
  FSEARCH_KILL_AT     "point:n[,point:n]": SIGKILL this scheduler the n-th time it reaches `point` (KILL_POINTS)

Torch-free.
"""
from __future__ import annotations

import ctypes
import fnmatch
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from filelock import FileLock, Timeout
from pydantic import ValidationError

from orchestrator.claims import (DONE, HEARTBEAT_S, PROBE_PREFIX, STALE_AFTER_S, WAIT_S, Heartbeat, Lease, RoundClaims,
                                 worker_name)
from orchestrator.records import Ledger, Record, utc_now
from orchestrator.runconfig import EXIT_KIND, EXIT_OK, RunConfig, RunResult
from orchestrator.study import (SPEC_ATTR, RoundStudy, default_storage_url, is_shared_storage,
                                require_shared_storage)

WORKER_CMD_ENV = "FSEARCH_WORKER_CMD"
FAULTS_ENV = "FSEARCH_FAULTS"
KILL_ENV = "FSEARCH_KILL_AT"

POLL_S = 0.2  # how often the scheduler looks at the worker (exit, progress.json)
TERM_GRACE_S = 5.0  # after SIGTERM to a worker's process group, wait this long before SIGKILL
POOL_POLL_S = 0.5  # how often `fsearch round --workers N` looks at its workers and the round's records
PROBE_TIME_LIMIT_S = 1800.0  # the batch probe: model build + a few forward/backward passes per size
ERROR_TAIL_LINES = 4  # log lines kept as the error message when a worker dies without result.json

# retried up to `retries` ("lost": a shared round's worker died mid-run and another took its unit over);
# oom halves the micro-batch; data/config fail at once
RETRYABLE = ("crash", "timeout", "lost")

# kill points (FSEARCH_KILL_AT), in the order a run meets them
KILL_POINTS = (
    "stage",  # the next unit starts a new (task, stage): before it is claimed
    "claim",  # trial created (RUNNING), nothing spawned yet
    "spawn",  # worker process started
    "run",  # worker running and has written progress.json
    "outcome",  # worker finished and its outcome is classified; nothing recorded yet
    "torn_record",  # half of the record's line written (no newline): what a crash mid-write leaves
    "record",  # record appended and fsynced; the trial not yet told
    "tell",  # trial told: between two runs
    "probe",  # batch probe result written, not yet stored in the study
)


class SchedulerError(Exception):
    """A user-facing problem that stops a round (one line): bad hook settings, a round locked by another scheduler,
    a failed batch probe."""


class RoundLocked(SchedulerError):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# test hooks

class KillPoints:
    """SIGKILL this process the n-th time it reaches a named point (FSEARCH_KILL_AT="record:3,claim:1")."""

    def __init__(self, spec: str | None):
        self.targets: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in (spec or "").split(","))):
            name, _, n = part.partition(":")
            if name not in KILL_POINTS or not (n or "1").isdigit() or int(n or "1") < 1:
                raise SchedulerError(f"{KILL_ENV}: {part!r} is not POINT:N with POINT in {', '.join(KILL_POINTS)}")
            self.targets[name] = int(n or "1")

    @classmethod
    def from_env(cls) -> "KillPoints":
        return cls(os.environ.get(KILL_ENV))

    def due(self, name: str) -> bool:
        """Count a visit; True when this visit is the one to die at."""
        if name not in self.targets:
            return False
        self.counts[name] = self.counts.get(name, 0) + 1
        return self.counts[name] == self.targets[name]

    def hit(self, name: str) -> None:
        if self.due(name):
            self.die()

    @staticmethod
    def die() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def parse_faults(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    from typing import get_args

    from orchestrator.runconfig import Fault

    try:
        faults = json.loads(text)
    except ValueError as e:
        raise SchedulerError(f"{FAULTS_ENV}: not JSON ({e})") from None
    if not isinstance(faults, dict):
        raise SchedulerError(f"{FAULTS_ENV}: expected a JSON object {{pattern: fault}}")
    for pattern, fault in faults.items():
        if fault not in get_args(Fault):
            raise SchedulerError(f"{FAULTS_ENV}: fault {fault!r} for {pattern!r} is not one of {get_args(Fault)}")
    return faults


def fault_for(run_key: str, faults: dict[str, str]) -> str | None:
    for pattern, fault in faults.items():
        if fnmatch.fnmatchcase(run_key, pattern):
            return fault
    return None


def worker_command(cmd: str | list[str] | None = None) -> list[str]:
    """The worker command: an argument, else $FSEARCH_WORKER_CMD, else this interpreter's `-m worker`."""
    if isinstance(cmd, list):
        return list(cmd)
    text = cmd or os.environ.get(WORKER_CMD_ENV)
    if text:
        parts = shlex.split(text)
        if not parts:
            raise SchedulerError(f"{WORKER_CMD_ENV} is empty")
        return parts
    return [sys.executable, "-m", "worker"]


# ---------------------------------------------------------------------------------------------------------------------
# one worker process

def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGKILL it when the scheduler dies (no orphaned GPU jobs)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class WorkerProcess:
    """A worker subprocess in its own process group (session); stdout and stderr go to `log_path`."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.argv = argv
        self.log_path = log_path
        parent = os.getpid()

        def preexec() -> None:
            _die_with_parent()
            if os.getppid() != parent:  # the scheduler died before prctl took effect
                os._exit(1)

        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=preexec, env=env, cwd=cwd)
        self.pid = self.proc.pid
        self.started = time.time()
        self.timed_out = False

    def wait(self, time_limit_s: float, poll: Callable[[], None] | None = None, poll_s: float = POLL_S,
             term_grace_s: float = TERM_GRACE_S) -> int:
        """Wait for exit; past the time limit, SIGTERM then SIGKILL the whole group. Returns the exit code
        (negative: killed by that signal)."""
        deadline = self.started + time_limit_s
        while True:
            try:
                code = self.proc.wait(timeout=max(0.0, min(poll_s, deadline - time.time())))
                break
            except subprocess.TimeoutExpired:
                pass
            if poll is not None:
                poll()
            if time.time() >= deadline:
                self.timed_out = True
                self.signal_group(signal.SIGTERM)
                try:
                    code = self.proc.wait(timeout=term_grace_s)
                except subprocess.TimeoutExpired:
                    self.signal_group(signal.SIGKILL)
                    code = self.proc.wait()
                break
        self.signal_group(signal.SIGKILL)  # whatever the worker left in its group (data loaders, grandchildren)
        return code

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def bytecode_cache_dir(env: dict[str, str]) -> str | None:
    """A writable bytecode folder for the workers when torch is installed read-only without bytecode, else None.

    Python caches compiled modules next to their source; where it cannot (a read-only image without .pyc files), each
    worker compiles torch's modules again: about 5 s of every run's start-up in a profile on an H100 machine. The
    worker's environment then points PYTHONPYCACHEPREFIX at a per-user cache, unless the user set it or turned
    bytecode writing off. Finds torch without importing it."""
    if env.get("PYTHONPYCACHEPREFIX") or env.get("PYTHONDONTWRITEBYTECODE"):
        return None
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = Path(next(iter(spec.submodule_search_locations)))
    compiled = pkg / "__pycache__" / f"__init__.{sys.implementation.cache_tag}.pyc"
    if compiled.exists() or os.access(pkg, os.W_OK):
        return None
    cache_home = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache_home) / "fsearch" / "pycache")


def worker_environment(devices: str | None = None) -> dict[str, str]:
    """The worker's environment: ours, minus the scheduler's kill hook, unbuffered output, this checkout importable,
    a writable bytecode cache where torch's install has none (bytecode_cache_dir), and CUDA_VISIBLE_DEVICES when
    devices are given."""
    env = dict(os.environ)
    env.pop(KILL_ENV, None)
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    pycache = bytecode_cache_dir(env)
    if pycache:
        env["PYTHONPYCACHEPREFIX"] = pycache
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return env


def start_worker(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> "WorkerProcess":
    """WorkerProcess, with a worker command that cannot start turned into one clear line."""
    try:
        return WorkerProcess(argv, log_path, env=env)
    except OSError as e:
        raise SchedulerError(f"the worker command cannot start ({shlex.join(argv[:3])} ...): {e.strerror or e}") \
            from None


def kill_leftover_worker(attempt_dir: Path) -> None:
    """A worker of an interrupted attempt that is somehow still alive (its pid file names it and its command line
    names its run file): kill its process group before the run starts again."""
    pid_file = attempt_dir / "worker.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return
    if str(attempt_dir / "run.json") in cmdline:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ---------------------------------------------------------------------------------------------------------------------
# outcomes

@dataclass
class Outcome:
    """How one attempt ended. kind: ok | diverged | oom | crash | timeout | data | config."""

    kind: str
    result: RunResult | None
    exit_code: int | None
    message: str | None = None

    @property
    def is_result(self) -> bool:
        return self.kind in ("ok", "diverged")


def log_tail(path: Path, lines: int = ERROR_TAIL_LINES) -> str | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail)[-1000:] if tail else None


def read_result(run_dir: Path) -> RunResult | None:
    try:
        return RunResult.model_validate_json((run_dir / "result.json").read_bytes())
    except (OSError, ValueError, ValidationError):
        return None


def classify(run_dir: Path, exit_code: int, timed_out: bool, log_path: Path, time_limit_s: float) -> Outcome:
    """result.json first (written atomically by the worker), the exit code as fallback; a timeout wins over both."""
    if timed_out:
        return Outcome("timeout", None, exit_code, f"no result within the time limit of {time_limit_s:g} s "
                                                    f"(worker process group killed)")
    result = read_result(run_dir)
    if result is not None:
        if result.status == "ok":
            return Outcome("ok", result, exit_code)
        if result.status == "diverged":
            return Outcome("diverged", result, exit_code, result.error_message)
        kind = result.error_kind or EXIT_KIND.get(exit_code, "crash")
        if kind in ("ok", "diverged"):
            kind = "crash"
        return Outcome(kind, result, exit_code, result.error_message or log_tail(log_path))
    if exit_code == EXIT_OK:
        return Outcome("crash", None, exit_code, "worker exited 0 without writing result.json")
    if exit_code < 0:
        return Outcome("crash", None, exit_code, f"worker killed by signal {-exit_code}"
                                                 + (f": {log_tail(log_path)}" if log_tail(log_path) else ""))
    kind = EXIT_KIND.get(exit_code, "crash")
    return Outcome(kind, None, exit_code, log_tail(log_path) or f"worker exited with code {exit_code}")


def halve_micro_batch(micro_batch: int, batch_size: int) -> int | None:
    """The largest divisor of the effective batch at most half the micro-batch (the effective batch stays), or None."""
    if micro_batch <= 1:
        return None
    target = micro_batch // 2
    for d in range(target, 0, -1):
        if batch_size % d == 0:
            return d
    return None


@dataclass
class AttemptLog:
    """The attempts of one run (kept in the trial's user attrs, so a resumed scheduler continues the same count)."""

    history: list[dict[str, Any]] = field(default_factory=list)

    def add(self, attempt: int, micro_batch: int, outcome: Outcome) -> None:
        self.history.append({"attempt": attempt, "micro_batch": micro_batch, "outcome": outcome.kind,
                             "exit_code": outcome.exit_code, "message": (outcome.message or "")[:300] or None})

    def retries_used(self) -> int:
        return sum(1 for h in self.history if h["outcome"] in RETRYABLE)


@dataclass
class RunStart:
    """How a run begins in this process: its trial, attempt history and micro-batch; attempt numbers from
    `first_attempt` on (another host may have used lower ones); `over`: the run already has its final outcome."""

    number: int
    log: AttemptLog
    micro_batch: int
    first_attempt: int = 0
    over: Outcome | None = None


# ---------------------------------------------------------------------------------------------------------------------
# the round

@dataclass
class ActiveRun:
    """What the display needs to know about the run in progress."""

    unit: Any
    attempt: int
    micro_batch: int
    run_dir: Path
    started: float
    progress: dict[str, Any] = field(default_factory=dict)


class RoundScheduler:
    """Runs one round to completion (or until interrupted). Single worker, one GPU; its study on SQLite (a PostgreSQL
    round runs through SharedScheduler: `scheduler_for`)."""

    shared = False

    def __init__(self, spec: Any, *, round_dir: Path | None = None, storage_url: str | None = None,
                 worker_cmd: str | list[str] | None = None, display: Any = None, devices: str | None = None,
                 poll_s: float = POLL_S, term_grace_s: float = TERM_GRACE_S):
        from orchestrator import planner as planner_mod

        self.planner = planner_mod
        self.spec = spec
        self.round_dir = Path(round_dir or spec.round_dir)
        self.storage_url = storage_url or getattr(spec, "storage", None) or default_storage_url(self.round_dir)
        self.probes: dict[str, dict[str, Any]] = {}
        self.worker_cmd = worker_command(worker_cmd)
        self.faults = parse_faults(os.environ.get(FAULTS_ENV))
        self.kill = KillPoints.from_env()
        self.display = display or NullDisplay()
        self.devices = devices
        self.poll_s = poll_s
        self.term_grace_s = term_grace_s
        if is_shared_storage(self.storage_url) and not self.shared:
            raise SchedulerError("a round on PostgreSQL runs through SharedScheduler (scheduler_for), whose claims "
                                 "keep several workers apart")
        self.ledger = Ledger(self.round_dir / "records.jsonl")
        self.lock = FileLock(str(self.round_dir / "round.lock"))
        self.study: RoundStudy | None = None
        self.records: list[Record] = []
        self.adoptable: dict[str, int] = {}
        self.active: ActiveRun | None = None
        self._last_stage: tuple[str, str] | None = None

    # top level ------------------------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the round's lock (non-blocking): RoundLocked if another scheduler runs this round."""
        if self.lock.is_locked:
            return
        self.round_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise RoundLocked(f"round {self.round_dir} is already being run by another scheduler "
                              f"(lock {self.lock.lock_file} is held)") from None
        (self.round_dir / "scheduler.pid").write_text(f"{os.getpid()}\n")

    def release(self) -> None:
        if self.lock.is_locked:
            try:
                (self.round_dir / "scheduler.pid").unlink(missing_ok=True)
            finally:
                self.lock.release()

    def run(self) -> list[Record]:
        """Run the round to its end (taking the lock unless `acquire` did); returns every record of the round."""
        self.acquire()
        previous = signal.getsignal(signal.SIGTERM)
        in_main_thread = _in_main_thread()
        if in_main_thread:  # SIGTERM ends a round like Ctrl-C: the worker's group is killed, the trial is resumed later
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            return self._run_locked()
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
            self.release()

    def _run_locked(self) -> list[Record]:
        save_spec_copy(self.spec, self.round_dir)
        self.records = self.ledger.read()
        self.study = RoundStudy.create_or_load(self.storage_url, self.spec.round)
        labels, candidates = spec_labels(self.spec)
        self.study.fix_choices(labels, candidates)
        self.adoptable = self.study.reconcile(self.records)
        self.probes = self.ensure_probes()
        self.display.round_started(self)
        while True:
            plan = self.plan()
            if not plan.runnable:
                break
            unit = plan.runnable[0]
            stage_id = (unit.task, unit.stage)
            if self._last_stage is not None and stage_id != self._last_stage:
                self.kill.hit("stage")
            self._last_stage = stage_id
            self.execute(unit)
        for key, number in sorted(self.adoptable.items()):
            self.study.fail(number, f"run {key} is no longer part of the round's plan (the spec changed)")
        self.adoptable.clear()
        self.display.round_finished(self)
        return self.records

    def plan(self) -> Any:
        return self.planner.plan(self.spec, self.records, batch_sizes=self.batch_sizes())

    def batch_sizes(self) -> dict[str, int]:
        """Effective batch of every `batch: auto` task: the probe's micro-batch (no accumulation)."""
        return {task: int(p["micro_batch"]) for task, p in self.probes.items()}

    # one run --------------------------------------------------------------------------------------------------------
    def execute(self, unit: Any) -> Record:
        assert self.study is not None
        runs_dir = self.round_dir / "runs" / unit.run_key
        start = self.open_run(unit, runs_dir)
        self.kill.hit("claim")
        if start.over is not None:  # ended before any attempt here (its lost attempts used up the retries)
            attempt = max(0, start.first_attempt - 1)
            attempt_dir = runs_dir / f"attempt-{attempt}"
            cfg, outcome = self.base_config(unit, attempt_dir, attempt, start.micro_batch), start.over
        else:
            cfg, outcome, attempt_dir = self.run_attempts(unit, runs_dir, start)
        record = self.make_record(unit, cfg, outcome, attempt_dir)
        self.commit_record(record)
        self.study.finish(start.number, record)
        self.records.append(record)
        self.after_tell(record)
        self.kill.hit("tell")
        self.display.run_finished(self, record)
        return record

    def open_run(self, unit: Any, runs_dir: Path) -> "RunStart":
        """The run's trial: the RUNNING one a killed scheduler left (adopted), else a new one."""
        micro_batch = self.first_micro_batch(unit, runs_dir)
        number = self.adoptable.pop(unit.run_key, None)
        if number is None:
            return RunStart(self.new_trial(unit, runs_dir, micro_batch), AttemptLog(), micro_batch)
        return self.adopt_trial(unit, number, runs_dir, micro_batch)

    def first_micro_batch(self, unit: Any, runs_dir: Path) -> int:
        cfg = self.base_config(unit, runs_dir / "attempt-0", 0)
        return cfg.micro_batch or cfg.batch_size

    def new_trial(self, unit: Any, runs_dir: Path, micro_batch: int, **attrs: Any) -> int:
        assert self.study is not None
        cfg = self.base_config(unit, runs_dir / "attempt-0", 0)
        return self.study.claim(cfg.task, cfg.stage, cfg.candidate, cfg.seed,
                                {"run_key": unit.run_key, "attempt": 0, "micro_batch": micro_batch,
                                 "batch_size": cfg.batch_size, "attempts": [], **attrs})

    def adopt_trial(self, unit: Any, number: int, runs_dir: Path, micro_batch: int) -> "RunStart":
        """Resume a run in its RUNNING trial: its attempt history, micro-batch and attempt count go on."""
        assert self.study is not None
        attrs = self.study.trial(number).user_attrs
        log = AttemptLog(list(attrs.get("attempts") or []))
        micro_batch = int(attrs.get("micro_batch") or micro_batch)
        first = int(attrs.get("attempt") or 0) + 1 if attrs.get("run_dir") else 0  # an attempt was started
        for d in sorted(runs_dir.glob("attempt-*")):
            kill_leftover_worker(d)
        self.display.message(f"resuming {unit.run_key} (trial {number}, {len(log.history)} earlier attempt(s))")
        return RunStart(number, log, micro_batch, first)

    def run_attempts(self, unit: Any, runs_dir: Path, start: "RunStart") -> tuple[RunConfig, Outcome, Path]:
        """Attempts until an outcome is final: oom halves the micro-batch, crash/timeout retry up to `retries`."""
        assert self.study is not None
        run_key, number, log, micro_batch = unit.run_key, start.number, start.log, start.micro_batch
        while True:
            self.check_lease(confirm=True)
            attempt = max(next_attempt(runs_dir), start.first_attempt)
            attempt_dir = runs_dir / f"attempt-{attempt}"
            cfg = self.base_config(unit, attempt_dir, attempt, micro_batch)
            self.study.set_attrs(number, {"attempt": attempt, "micro_batch": micro_batch, "run_dir": str(attempt_dir)})
            outcome = self.run_attempt(unit, cfg, attempt_dir)
            self.check_lease(confirm=True)
            log.add(attempt, micro_batch, outcome)
            self.study.set_attrs(number, {"attempts": log.history})
            if outcome.kind == "oom":
                smaller = halve_micro_batch(micro_batch, cfg.batch_size)
                if smaller is not None:
                    self.display.message(f"{run_key}: out of memory at micro-batch {micro_batch}; retrying with "
                                         f"{smaller} (x{cfg.batch_size // smaller} accumulation, same batch)")
                    micro_batch = smaller
                    self.study.set_attrs(number, {"micro_batch": micro_batch})
                    continue
                outcome.message = f"out of memory at micro-batch {micro_batch}: {outcome.message or ''}".strip()
            elif outcome.kind in RETRYABLE and log.retries_used() <= self.retries_for(unit):
                self.display.message(f"{run_key}: {outcome.kind} ({outcome.message}); retry "
                                     f"{log.retries_used()}/{self.retries_for(unit)}")
                continue
            return cfg, outcome, attempt_dir

    def commit_record(self, record: Record) -> None:
        """Append the record to the ledger (the round's truth on a single-scheduler storage)."""
        if self.kill.due("torn_record"):
            self.ledger.write_torn(record)
            self.kill.die()
        self.ledger.append(record)
        self.kill.hit("record")

    def after_tell(self, record: Record) -> None:
        """Hook: the run's trial is told."""

    def check_lease(self, confirm: bool = False) -> None:
        """Hook: a shared round's worker stops here (ClaimLost) when another worker has taken its unit over;
        `confirm`: ask the database now rather than trust the heartbeat thread's last answer."""

    def run_attempt(self, unit: Any, cfg: RunConfig, attempt_dir: Path) -> Outcome:
        attempt_dir.mkdir(parents=True, exist_ok=True)
        run_file = attempt_dir / "run.json"
        write_text_atomic(run_file, cfg.model_dump_json(indent=1))
        log_path = attempt_dir / "worker.log"
        limit = self.time_limit_for(unit)
        self.active = ActiveRun(unit, cfg.attempt, cfg.micro_batch or cfg.batch_size, attempt_dir, time.time())
        self.display.run_started(self, self.active)
        proc = start_worker(self.worker_cmd + [str(run_file)], log_path, env=self.worker_env())
        write_text_atomic(attempt_dir / "worker.pid", f"{proc.pid}\n")
        self.kill.hit("spawn")
        seen_progress = False

        def poll() -> None:
            nonlocal seen_progress
            self.check_lease()
            prog = read_progress(attempt_dir)
            if prog is not None:
                self.active.progress = prog
                if not seen_progress:
                    seen_progress = True
                    self.kill.hit("run")
            self.display.run_progress(self, self.active)

        try:
            code = proc.wait(limit, poll=poll, poll_s=self.poll_s, term_grace_s=self.term_grace_s)
        except BaseException:
            proc.kill()
            raise
        finally:
            self.active = None
        outcome = classify(attempt_dir, code, proc.timed_out, log_path, limit)
        self.kill.hit("outcome")
        return outcome

    def worker_env(self) -> dict[str, str]:
        return worker_environment(self.devices)

    # unit facts -----------------------------------------------------------------------------------------------------
    def base_config(self, unit: Any, run_dir: Path, attempt: int, micro_batch: int | None = None) -> RunConfig:
        mb = micro_batch if micro_batch is not None and micro_batch != unit.batch_size else None
        return unit.run_config(run_dir=str(run_dir), attempt=attempt, micro_batch=mb,
                               fault=fault_for(unit.run_key, self.faults))

    def retries_for(self, unit: Any) -> int:
        return int(unit.retries)

    def time_limit_for(self, unit: Any) -> float:
        return float(unit.time_limit_s)

    def make_record(self, unit: Any, cfg: RunConfig, outcome: Outcome, attempt_dir: Path) -> Record:
        """The run's record: the worker's result, and the comparison with its matched baseline (planner.judge)."""
        res = outcome.result
        primary = (res.primary_metric if res is not None else None) or "tok_acc"
        metric = unit.metric_name(primary)
        status, value = "failed", None
        error_kind, error_message = outcome.kind, outcome.message
        if outcome.kind == "ok" and res is not None:
            value = unit.value_from(res.final, primary)
            status, error_kind, error_message = "ok", None, None
            if value is None:
                status, error_kind = "failed", "config"
                error_message = (f"the worker reported no finite 'val_{metric}' (it reported "
                                 f"{', '.join(sorted(res.final)) or 'nothing'})")
        elif outcome.kind == "diverged":
            status = "diverged"
        j = self.planner.judge(unit, status, value, self.records)
        ok = status == "ok" and res is not None
        best = dict(res.best) if ok else {}
        mb = cfg.micro_batch or cfg.batch_size
        return Record(
            round=cfg.round, task=cfg.task, task_kind=cfg.task_kind, stage=cfg.stage, candidate=cfg.candidate,
            mode=cfg.mode, seed=cfg.seed, run_key=cfg.run_key, attempt=cfg.attempt,
            fs=cfg.fs.model_dump(mode="json") if cfg.fs is not None else None,
            batch_size=cfg.batch_size, micro_batch=mb, grad_accum=cfg.batch_size // mb,
            steps=res.steps if res is not None else 0, budget_steps=cfg.steps, eval_every=cfg.eval_every,
            n_val=cfg.n_val, data_seed=cfg.data_seed, status=status, error_kind=error_kind,
            error_message=error_message, metric=metric, value=value,
            final=dict(res.final) if res is not None else {}, best=best, best_step=res.best_step if ok else None,
            test=dict(res.test) if ok else {}, baseline_key=j.baseline_key, baseline_value=j.baseline_value,
            delta=j.delta, threshold=j.threshold, decision=j.decision,
            wall_s=res.wall_s if res is not None else 0.0, tokens_per_s=res.tokens_per_s if res is not None else 0.0,
            peak_mem_bytes=res.peak_mem_bytes if res is not None else None,
            device=res.device if res is not None else None, compiled=res.compiled if res is not None else None,
            run_dir=str(attempt_dir), finished_at=utc_now(),
            best_val_loss=best.get("val_loss"), best_val_tok_acc=best.get("val_tok_acc"),
        )

    # batch probe ----------------------------------------------------------------------------------------------------
    def ensure_probes(self) -> dict[str, dict[str, Any]]:
        """Batch size of every `batch: auto` task, decided once per round and reused on resume: the worker's GPU probe
        (<round>/probe/<task>.json, also a study user attribute), or defaults.probe.cpu_batch on a CPU round."""
        probes: dict[str, dict[str, Any]] = {}
        spec = self.spec
        for task in [label for label, t in spec.tasks.items() if t.batch == "auto"]:
            path = self.round_dir / "probe" / f"{task}.json"
            used = [r.batch_size for r in self.records if r.task == task]
            if path.exists():
                probes[task] = json.loads(path.read_text())
            elif used:  # the probe file is gone but the task already ran: keep the batch its records used
                probes[task] = {"micro_batch": used[-1], "source": "records (probe file missing)"}
            else:
                probes[task] = self.probe_task(task)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, json.dumps(probes[task], indent=1))
                self.kill.hit("probe")
            if self.study is not None and self.study.study_attr(f"probe.{task}") != probes[task]:
                self.study.set_study_attr(f"probe.{task}", probes[task])
        return probes

    def probe_task(self, task: str) -> dict[str, Any]:
        conf = self.spec.defaults.probe
        if self.spec.defaults.device == "cpu":
            return {"micro_batch": conf.cpu_batch, "source": "defaults.probe.cpu_batch (device cpu)"}
        request = {"run": self.probe_run_config(task).model_dump(mode="json"),
                   "candidates": list(conf.micro_batches), "margin": conf.margin}
        try:
            return self.run_probe(task, request)
        except ProbeFailed as e:
            if e.kind == "config" and self.spec.defaults.device == "auto" and conf.cpu_batch is not None:
                self.display.message(f"{task}: the batch probe could not run ({e.message}); batch auto -> "
                                     f"defaults.probe.cpu_batch = {conf.cpu_batch}")
                return {"micro_batch": conf.cpu_batch, "source": f"defaults.probe.cpu_batch ({e.message})"}
            raise SchedulerError(f"tasks.{task}.batch: the batch probe failed ({e.kind}): {e.message}") from None

    def probe_run_config(self, task: str) -> RunConfig:
        """The heaviest run of the task (by memory): an FS candidate that keeps gradients through the seed if there is
        one, then any FS candidate, then read_twice, then the baseline; the worker probes worst-case lengths."""
        import dataclasses

        largest = max(self.spec.defaults.probe.micro_batches)
        units = self.planner.plan(self.spec, self.records, batch_sizes={**self.batch_sizes(), task: largest}).runnable
        base = next(u for u in units if u.task == task and u.is_baseline)

        def weight(c: Any) -> tuple[int, int]:
            if c.fs is not None:
                return (3 if not c.fs.detach else 2, 1 if c.fs.variant != "scalar" else 0)
            return (1 if c.mode == "read_twice" else 0, 0)

        heaviest = max(self.spec.candidates(task), key=weight, default=None)
        unit = dataclasses.replace(base, candidate=heaviest) if heaviest is not None else base
        return unit.run_config(run_dir=str(self.round_dir / "probe" / task), micro_batch=None,
                               fault=fault_for(f"{task}.probe", self.faults))

    def run_probe(self, task: str, request: dict[str, Any]) -> dict[str, Any]:
        work = self.round_dir / "probe" / task
        work.mkdir(parents=True, exist_ok=True)
        probe_file = work / "PROBE.json"
        (work / "probe_result.json").unlink(missing_ok=True)
        write_text_atomic(probe_file, json.dumps(request, indent=1))
        self.display.message(f"{task}: batch probe over micro-batches {request['candidates']}")
        proc = start_worker(self.worker_cmd + ["--probe", str(probe_file)], work / "worker.log",
                            env=self.worker_env())
        try:
            code = proc.wait(PROBE_TIME_LIMIT_S, poll_s=self.poll_s, term_grace_s=self.term_grace_s)
        except BaseException:
            proc.kill()
            raise
        try:
            result = json.loads((work / "probe_result.json").read_text())
        except (OSError, ValueError):
            result = {}
        if code != EXIT_OK or not isinstance(result.get("micro_batch"), int):
            kind = "timeout" if proc.timed_out else (result.get("error_kind") or EXIT_KIND.get(code, "crash"))
            why = result.get("error_message") or log_tail(work / "worker.log") or f"exit code {code}"
            raise ProbeFailed(kind, why)
        self.display.message(f"{task}: batch probe picked micro-batch {result['micro_batch']}")
        return result


class ProbeFailed(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


class NullDisplay:
    def round_started(self, sched: RoundScheduler) -> None: ...
    def run_started(self, sched: RoundScheduler, active: ActiveRun) -> None: ...
    def run_progress(self, sched: RoundScheduler, active: ActiveRun) -> None: ...
    def run_finished(self, sched: RoundScheduler, record: Record) -> None: ...
    def round_finished(self, sched: RoundScheduler) -> None: ...
    def message(self, text: str) -> None: ...


# ---------------------------------------------------------------------------------------------------------------------
# several workers on a shared (PostgreSQL) storage

class ClaimLost(Exception):
    """Another worker took this worker's unit over: its heartbeats stopped for longer than the claim's timeout."""


class SharedScheduler(RoundScheduler):
    """One of any number of workers of a round whose study lives in PostgreSQL (`fsearch worker`, and
    `fsearch round --storage postgresql://...`), on any number of hosts.

    Each loop: the round's records from the database -> the planner -> the first runnable unit no live claim holds is
    claimed atomically (orchestrator.claims) -> run under a heartbeat thread, as the single scheduler runs a unit ->
    record committed to the database with the claim still held -> trial told -> claim done. Stage barriers are the
    planner's: a unit is runnable only once the records it depends on exist, so a med unit starts only after its task's
    quick stage is recorded. When every runnable unit is held by others the worker waits (`wait_s`) and plans again;
    it exits when the plan has nothing left. A worker whose claim was taken over (it fell silent past the timeout)
    kills its run and records nothing. A unit taken over from a dead worker is resumed in the same trial; the lost
    attempt counts as a crash retry.

    Records: the database's fsearch_records table is the round's truth; <round>/records.jsonl on each host is its
    mirror (appended under the ledger's file lock after each record, and on start and exit), so `status`, `export`
    and `report` read a consistent file. Only a coordinator (`fsearch round`) takes the round lock; workers do not.
    """

    shared = True

    def __init__(self, spec: Any, *, coordinator: bool = False, worker_id: str | None = None,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S, wait_s: float = WAIT_S,
                 **kw: Any):
        super().__init__(spec, **kw)
        require_shared_storage(self.storage_url, "a round shared by several workers")
        if not (heartbeat_s > 0 and stale_after_s >= 2 * heartbeat_s):
            raise SchedulerError(f"stale-after {stale_after_s:g} s must be at least twice the heartbeat interval "
                                 f"({heartbeat_s:g} s), or a live worker loses its claims")
        self.coordinator = coordinator
        self.worker_id = worker_id or worker_name()
        self.heartbeat_s, self.stale_after_s, self.wait_s = heartbeat_s, stale_after_s, wait_s
        self.claims: RoundClaims | None = None
        self.lease: Lease | None = None
        self.recorded_here: list[Record] = []

    def acquire(self) -> None:
        if self.coordinator:  # two coordinators of a round are refused; any number of workers may join
            super().acquire()

    def release(self) -> None:
        if self.coordinator:
            super().release()

    # set-up ---------------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Open the study and the claim tables, publish the spec, read the records, mirror them, repair trials."""
        self.round_dir.mkdir(parents=True, exist_ok=True)
        local = self.ledger.read()  # before the database: the mirror never runs ahead of it
        self.study = RoundStudy.create_or_load(self.storage_url, self.spec.round)
        self.claims = RoundClaims(self.study.storage.engine, self.spec.round, self.worker_id, self.stale_after_s)
        self.claims.ensure_tables()
        labels, candidates = spec_labels(self.spec)
        self.study.fix_choices(labels, candidates)
        self.publish_spec()
        save_spec_copy(self.spec, self.round_dir)
        self.refresh()
        extra = sorted({r.run_key for r in local} - {r.run_key for r in self.records})
        if extra:
            raise SchedulerError(
                f"{self.ledger.path} has {len(extra)} record(s) that the storage {_safe(self.storage_url)} does not "
                f"(e.g. {extra[0]}): this round folder was run with another storage; use that storage, or another "
                f"results folder for this one")
        self.sync_ledger()
        self.repair_trials()

    def publish_spec(self) -> None:
        """Keep the spec in the study (workers started with only --round read it). A coordinator's spec replaces the
        stored one (a resumed round may change its spec, as with one scheduler); a worker's must match it."""
        assert self.study is not None
        text = spec_text(self.spec)
        stored = self.study.study_attr(SPEC_ATTR)
        if stored is None or self.coordinator:
            if stored != text:
                self.study.set_study_attr(SPEC_ATTR, text)
            return
        if stored != text and _spec_fields(stored) != _spec_fields(self.spec):
            raise SchedulerError(f"spec: differs from the spec round {self.spec.round} runs with (kept in its study); "
                                 f"start this worker without --spec to use the round's")

    # the loop -------------------------------------------------------------------------------------------------------
    def _run_locked(self) -> list[Record]:
        self.prepare()
        self.probes = self.ensure_probes()
        self.display.round_started(self)
        waiting = False
        while True:
            self.refresh()
            plan = self.plan()
            if not plan.runnable:
                break
            stage_id = (plan.runnable[0].task, plan.runnable[0].stage)
            if self._last_stage is not None and stage_id != self._last_stage:
                self.kill.hit("stage")
            self._last_stage = stage_id
            claimed = self.claim_next(plan.runnable)
            if claimed is None:
                if not waiting:
                    self.display.message(f"waiting: the {len(plan.runnable)} runnable unit(s) are held by other "
                                         f"workers; looking again every {self.wait_s:g} s")
                waiting = True
                time.sleep(self.wait_s)
                continue
            waiting = False
            self.execute_leased(*claimed)
        self.refresh()
        self.sync_ledger()
        self.repair_trials(final=True)
        self.display.round_finished(self)
        return self.records

    def refresh(self) -> None:
        assert self.claims is not None
        self.records = self.claims.records()

    def sync_ledger(self) -> None:
        self.ledger.append_missing(self.records)

    def claim_next(self, runnable: list[Any]) -> tuple[Any, Lease] | None:
        """The first runnable unit this worker could claim (in plan order), with its lease; None when all are held."""
        assert self.claims is not None
        busy = self.claims.busy_keys()
        for unit in runnable:
            if unit.run_key not in busy:
                lease = self.claims.try_claim(unit.run_key)
                if lease is not None:
                    return unit, lease
        return None

    def execute_leased(self, unit: Any, lease: Lease) -> Record | None:
        assert self.claims is not None
        self.lease = lease
        if lease.stolen_from:
            self.display.message(f"{unit.run_key}: taken over from worker {lease.stolen_from} (no heartbeat within "
                                 f"its timeout, or its process is gone)")
        try:
            with Heartbeat(self.claims, lease, self.heartbeat_s):
                record = self.execute(unit)
            self.recorded_here.append(record)
            return record
        except ClaimLost as e:
            self.display.message(str(e))
            return None
        except optuna.exceptions.UpdateFinishedTrialError:  # the new owner finished the trial while this one slept
            self.display.message(f"{unit.run_key}: another worker took this unit over and finished it; nothing "
                                 f"recorded here")
            return None
        except BaseException:
            try:  # interrupted or failed: give the unit back at once (its trial stays RUNNING, to be adopted)
                self.claims.release(lease)
            except Exception:  # noqa: BLE001 - the claim then goes stale and is taken over after the timeout
                pass
            raise
        finally:
            self.lease = None

    # hooks of the single scheduler's run ----------------------------------------------------------------------------
    def open_run(self, unit: Any, runs_dir: Path) -> RunStart:
        """The run's RUNNING trial if a worker left one (adopted), else a new trial. A unit taken over from a dead
        worker counts the lost attempt as a crash retry; with the retries used up, the run fails without another."""
        assert self.study is not None
        micro_batch = self.first_micro_batch(unit, runs_dir)
        trials = self.study.running_of(unit.run_key)
        for t in trials[1:]:
            self.study.fail(t.number, f"duplicate RUNNING trial of run {unit.run_key} (trial {trials[0].number} kept)")
        if not trials:
            number = self.new_trial(unit, runs_dir, micro_batch, worker=self.worker_id)
            return RunStart(number, AttemptLog(), micro_batch)
        start = self.adopt_trial(unit, trials[0].number, runs_dir, micro_batch)
        self.study.set_attrs(start.number, {"worker": self.worker_id})
        if self.lease is not None and self.lease.stolen_from:
            why = f"worker {self.lease.stolen_from} stopped sending heartbeats during this run"
            start.log.history.append({"attempt": max(0, start.first_attempt - 1), "micro_batch": start.micro_batch,
                                      "outcome": "lost", "exit_code": None, "message": why})
            self.study.set_attrs(start.number, {"attempts": start.log.history})
            if start.log.retries_used() > self.retries_for(unit):
                start.over = Outcome("lost", None, None, f"{why}; retries used up ({self.retries_for(unit)})")
        return start

    def check_lease(self, confirm: bool = False) -> None:
        if self.lease is None or self.claims is None:
            return
        if self.lease.lost.is_set() or (confirm and not self.claims.beat(self.lease)):
            raise ClaimLost(f"{self.lease.run_key}: another worker took this unit over (no heartbeat from this "
                            f"worker for over {self.stale_after_s:g} s); its run here is stopped, nothing recorded")

    def commit_record(self, record: Record) -> None:
        """The record into the database with the claim still held (else ClaimLost: nothing written), then into this
        host's records.jsonl mirror."""
        assert self.claims is not None and self.lease is not None
        if not self.claims.commit_record(self.lease, record):
            self.check_lease()
            raise ClaimLost(f"{record.run_key}: the claim is no longer this worker's; nothing recorded")
        self.ledger.append_missing(self.claims.records())
        self.kill.hit("record")

    def after_tell(self, record: Record) -> None:
        assert self.claims is not None and self.lease is not None
        self.claims.mark_done(self.lease)

    def repair_trials(self, final: bool = False) -> None:
        """RUNNING trials whose run has a record are told from it (a worker died between record and tell; telling
        twice is harmless). At the end of the round, RUNNING trials without a record and without a live owner are
        failed (their run left the plan). Others stay RUNNING, to be adopted by the unit's next claim."""
        assert self.study is not None and self.claims is not None
        by_key = {r.run_key: r for r in self.records}
        now, rows = self.claims.claims()
        owner_alive = {c.run_key for c in rows if c.state != DONE and c.fresh(now)}
        for t in self.study.running():
            key = t.user_attrs.get("run_key")
            if key in by_key:
                self.study.finish(t.number, by_key[key])
            elif final and key not in owner_alive:
                self.study.fail(t.number, f"run {key} is not part of the round's plan (the spec changed)")

    # batch probes ---------------------------------------------------------------------------------------------------
    def ensure_probes(self) -> dict[str, dict[str, Any]]:
        """One probe per `batch: auto` task for the whole round: the study keeps the result; a worker that finds none
        claims the probe (key probe:<task>) and runs it, the others wait for it."""
        probes: dict[str, dict[str, Any]] = {}
        for task in [label for label, t in self.spec.tasks.items() if t.batch == "auto"]:
            probes[task] = self.shared_probe(task)
            path = self.round_dir / "probe" / f"{task}.json"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, json.dumps(probes[task], indent=1))
        return probes

    def stored_probes(self) -> dict[str, dict[str, Any]]:
        """The probe results the study holds so far (what the coordinator of a worker pool plans with)."""
        assert self.study is not None
        attrs = self.study.storage.get_study_user_attrs(self.study.study_id)
        return {t: attrs[f"probe.{t}"] for t, ts in self.spec.tasks.items()
                if ts.batch == "auto" and f"probe.{t}" in attrs}

    def shared_probe(self, task: str) -> dict[str, Any]:
        assert self.study is not None and self.claims is not None
        waiting = False
        while True:
            value = self.study.study_attr(f"probe.{task}")
            if value is not None:
                return value
            lease = self.claims.try_claim(PROBE_PREFIX + task)
            if lease is None:
                if not waiting:
                    self.display.message(f"{task}: waiting for the batch probe another worker runs")
                waiting = True
                time.sleep(self.wait_s)
                continue
            try:
                with Heartbeat(self.claims, lease, self.heartbeat_s):
                    value = self.probe_task(task)
                    self.kill.hit("probe")
                    self.study.set_study_attr(f"probe.{task}", value)
            except BaseException:
                self.claims.release(lease)
                raise
            self.claims.mark_done(lease)
            return value


def scheduler_for(spec: Any, **kw: Any) -> RoundScheduler:
    """The scheduler for a spec's storage: RoundScheduler (SQLite: one scheduler, the ledger is the truth) or
    SharedScheduler (PostgreSQL: claims; a coordinator unless `coordinator=False`)."""
    round_dir = Path(kw.get("round_dir") or spec.round_dir)
    url = kw.get("storage_url") or getattr(spec, "storage", None) or default_storage_url(round_dir)
    if is_shared_storage(url):
        return SharedScheduler(spec, **{"coordinator": True, **kw})
    if any(kw.get(k) is not None for k in SHARED_ONLY):
        raise SchedulerError(f"{', '.join(k for k in SHARED_ONLY if kw.get(k) is not None)}: only for a "
                             f"PostgreSQL storage")
    return RoundScheduler(spec, **{k: v for k, v in kw.items() if k not in SHARED_ONLY})


SHARED_ONLY = ("coordinator", "worker_id", "heartbeat_s", "stale_after_s", "wait_s")


class WorkerPool:
    """`fsearch round --workers N` on a shared storage: N `fsearch worker` processes on this host, one device each
    (CUDA_VISIBLE_DEVICES), watched by this coordinator, which holds the round lock.

    Each worker's output goes to <round>/workers/worker-<i>.log; the coordinator prints each record as the database
    gets it. The workers die with the coordinator (and their runs with them). A worker that dies leaves its unit to the
    others; when all have exited with the plan unfinished, the round stops with one line naming the failed workers
    (run the same command to resume: units of this host's dead workers are taken over at once)."""

    def __init__(self, coordinator: SharedScheduler, n: int, spec_file: Path, devices: list[str | None],
                 poll_s: float = POOL_POLL_S):
        if n < 1 or len(devices) != n:
            raise SchedulerError(f"--workers {n}: needs one device entry per worker, got {devices}")
        self.c, self.n, self.spec_file, self.devices, self.poll_s = coordinator, n, Path(spec_file), devices, poll_s
        self.procs: list[WorkerProcess] = []

    def worker_argv(self, i: int) -> list[str]:
        c = self.c
        argv = [sys.executable, "-m", "orchestrator.cli", "worker", "--round", c.spec.round, "--storage",
                c.storage_url, "--spec", str(self.spec_file.resolve()), "--results",
                str(c.round_dir.resolve().parent), "--heartbeat-s", f"{c.heartbeat_s:g}", "--stale-after-s",
                f"{c.stale_after_s:g}", "--wait-s", f"{c.wait_s:g}", "--worker-cmd", shlex.join(c.worker_cmd)]
        if self.devices[i] is not None:
            argv += ["--gpu", str(self.devices[i])]
        return argv

    def log_path(self, i: int) -> Path:
        return self.c.round_dir / "workers" / f"worker-{i}.log"

    def run(self) -> list[Record]:
        c = self.c
        c.acquire()
        previous = signal.getsignal(signal.SIGTERM)
        in_main_thread = _in_main_thread()
        if in_main_thread:
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            c.prepare()
            c.probes = c.stored_probes()
            c.display.round_started(c)
            self.log_path(0).parent.mkdir(parents=True, exist_ok=True)
            for i in range(self.n):
                self.procs.append(start_worker(self.worker_argv(i), self.log_path(i), env=worker_environment()))
                c.display.message(f"worker {i}: pid {self.procs[-1].pid}"
                                  + (f", CUDA_VISIBLE_DEVICES={self.devices[i]}" if self.devices[i] is not None else "")
                                  + f", log {self.log_path(i)}")
            self.watch()
            return c.records
        finally:
            self.stop()
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
            c.release()

    def watch(self) -> None:
        c = self.c
        seen = {r.run_key for r in c.records}
        while True:
            running = [p for p in self.procs if p.proc.poll() is None]
            c.refresh()
            c.probes = c.stored_probes()
            for r in c.records:
                if r.run_key not in seen:
                    seen.add(r.run_key)
                    c.display.run_finished(c, r)
            if not running:
                break
            time.sleep(self.poll_s)
        c.sync_ledger()
        failed = [(i, p) for i, p in enumerate(self.procs) if p.proc.returncode != 0]
        if failed:
            why = "; ".join(f"worker {i} (exit {p.proc.returncode}): {log_tail(self.log_path(i), 1) or '-'}"
                            for i, p in failed)
            if c.plan().runnable:
                raise SchedulerError(f"{len(failed)} of {self.n} workers failed and the round is not finished "
                                     f"({why}); run the same command to resume")
            c.display.message(f"note: {len(failed)} worker(s) failed, the others finished the round ({why})")
        c.display.round_finished(c)

    def stop(self) -> None:
        """SIGTERM the workers still running (they give their units back), SIGKILL those that linger."""
        alive = [p for p in self.procs if p.proc.poll() is None]
        for p in alive:
            p.signal_group(signal.SIGTERM)
        deadline = time.time() + self.c.term_grace_s + TERM_GRACE_S
        for p in alive:
            try:
                p.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()


def pool_devices(n: int, gpu: str | None, device: str) -> list[str | None]:
    """One CUDA_VISIBLE_DEVICES value per worker: from --gpu (comma list), else none on a CPU round, else the devices
    this process sees (its CUDA_VISIBLE_DEVICES), else 0..n-1."""
    if gpu:
        parts = [x.strip() for x in gpu.split(",") if x.strip()]
        if len(parts) < n:
            raise SchedulerError(f"--gpu {gpu}: {n} workers need {n} devices (one each), got {len(parts)}")
        return list(parts[:n])
    if device == "cpu":
        return [None] * n
    visible = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    if visible:
        if len(visible) < n:
            raise SchedulerError(f"--workers {n}: CUDA_VISIBLE_DEVICES names {len(visible)} device(s); give --gpu")
        return list(visible[:n])
    return [str(i) for i in range(n)]


def _spec_fields(spec: Any) -> dict[str, Any]:
    """A spec's content for comparison, without what may differ by host (output folder, storage URL)."""
    if isinstance(spec, str):
        from orchestrator.spec import parse_spec_text

        spec = parse_spec_text(spec, "stored spec")
    return spec.model_dump(mode="json", exclude={"output", "storage"})


def _safe(url: str) -> str:
    from orchestrator.study import _safe_url

    return _safe_url(url)


# ---------------------------------------------------------------------------------------------------------------------
# helpers

def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def next_attempt(runs_dir: Path) -> int:
    """One past the highest attempt folder (attempt numbers are never reused, even after an interrupted attempt)."""
    nums = []
    for d in runs_dir.glob("attempt-*"):
        try:
            nums.append(int(d.name.split("-", 1)[1]))
        except ValueError:
            pass
    return max(nums) + 1 if nums else 0


def read_progress(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "progress.json").read_text())
    except (OSError, ValueError):
        return None


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # several workers of a round may write the same file
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def spec_text(spec: Any) -> str | None:
    """The spec's YAML: its file's text, else a dump of the parsed spec."""
    src = getattr(spec, "source", None)
    if src is not None and Path(src).exists():
        return Path(src).read_text()
    if hasattr(spec, "model_dump"):
        import yaml

        return yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False)
    return None


def save_spec_copy(spec: Any, round_dir: Path) -> None:
    """The spec as this round runs it (for `fsearch status` and the report), next to the records."""
    text = spec_text(spec)
    if text is not None:
        round_dir.mkdir(parents=True, exist_ok=True)
        if not (round_dir / "spec.yaml").exists() or (round_dir / "spec.yaml").read_text() != text:
            write_text_atomic(round_dir / "spec.yaml", text)


def spec_labels(spec: Any) -> tuple[list[str], list[str]]:
    """Task labels and every candidate name of the spec (for the study's categorical choices)."""
    names = {c.name for label in spec.tasks for c in spec.candidates(label)}
    return list(spec.tasks), sorted(names)
