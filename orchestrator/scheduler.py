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

Test hooks (environment):
  FSEARCH_WORKER_CMD  the worker command (shlex-split; the run file is appended), default `python -m orchestrator.worker`
  FSEARCH_FAULTS      JSON {"<fnmatch pattern on run_key>": "<fault>"} -> RunConfig.fault
  FSEARCH_KILL_AT     "point:n[,point:n]": SIGKILL this scheduler the n-th time it reaches `point` (KILL_POINTS)

Torch-free.
"""
from __future__ import annotations

import ctypes
import fnmatch
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

from filelock import FileLock, Timeout
from pydantic import ValidationError

from orchestrator.records import Ledger, Record, utc_now
from orchestrator.runconfig import EXIT_KIND, EXIT_OK, RunConfig, RunResult
from orchestrator.study import RoundStudy, default_storage_url

WORKER_CMD_ENV = "FSEARCH_WORKER_CMD"
FAULTS_ENV = "FSEARCH_FAULTS"
KILL_ENV = "FSEARCH_KILL_AT"

POLL_S = 0.2  # how often the scheduler looks at the worker (exit, progress.json)
TERM_GRACE_S = 5.0  # after SIGTERM to a worker's process group, wait this long before SIGKILL
PROBE_TIME_LIMIT_S = 1800.0  # the batch probe: model build + a few forward/backward passes per size
ERROR_TAIL_LINES = 4  # log lines kept as the error message when a worker dies without result.json

RETRYABLE = ("crash", "timeout")  # retried up to `retries`; oom halves the micro-batch; data/config fail at once

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
    """The worker command: an argument, else $FSEARCH_WORKER_CMD, else this interpreter's `-m orchestrator.worker`."""
    if isinstance(cmd, list):
        return list(cmd)
    text = cmd or os.environ.get(WORKER_CMD_ENV)
    if text:
        parts = shlex.split(text)
        if not parts:
            raise SchedulerError(f"{WORKER_CMD_ENV} is empty")
        return parts
    return [sys.executable, "-m", "orchestrator.worker"]


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


def worker_environment(devices: str | None = None) -> dict[str, str]:
    """The worker's environment: ours, minus the scheduler's kill hook, unbuffered output, this checkout importable,
    and CUDA_VISIBLE_DEVICES when devices are given."""
    env = dict(os.environ)
    env.pop(KILL_ENV, None)
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
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
    """Runs one round to completion (or until interrupted). Single worker, one GPU."""

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
        run_key = unit.run_key
        runs_dir = self.round_dir / "runs" / run_key
        base_cfg = self.base_config(unit, runs_dir / "attempt-0", 0)
        log = AttemptLog()
        micro_batch = base_cfg.micro_batch or base_cfg.batch_size
        number = self.adoptable.pop(run_key, None)
        if number is None:
            number = self.study.claim(base_cfg.task, base_cfg.stage, base_cfg.candidate, base_cfg.seed,
                                      {"run_key": run_key, "attempt": 0, "micro_batch": micro_batch,
                                       "batch_size": base_cfg.batch_size, "attempts": []})
        else:  # resume the run in the trial a killed scheduler left RUNNING
            attrs = self.study.trial(number).user_attrs
            log.history = list(attrs.get("attempts") or [])
            micro_batch = int(attrs.get("micro_batch") or micro_batch)
            for d in sorted(runs_dir.glob("attempt-*")):
                kill_leftover_worker(d)
            self.display.message(f"resuming {run_key} (trial {number}, {len(log.history)} earlier attempt(s))")
        self.kill.hit("claim")

        while True:
            attempt = next_attempt(runs_dir)
            attempt_dir = runs_dir / f"attempt-{attempt}"
            cfg = self.base_config(unit, attempt_dir, attempt, micro_batch)
            self.study.set_attrs(number, {"attempt": attempt, "micro_batch": micro_batch, "run_dir": str(attempt_dir)})
            outcome = self.run_attempt(unit, cfg, attempt_dir)
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
            break

        record = self.make_record(unit, cfg, outcome, attempt_dir)
        if self.kill.due("torn_record"):
            self.ledger.write_torn(record)
            self.kill.die()
        self.ledger.append(record)
        self.kill.hit("record")
        self.study.finish(number, record)
        self.records.append(record)
        self.kill.hit("tell")
        self.display.run_finished(self, record)
        return record

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
            device=res.device if res is not None else None, run_dir=str(attempt_dir), finished_at=utc_now(),
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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_spec_copy(spec: Any, round_dir: Path) -> None:
    """The spec as this round runs it (for `fsearch status` and the report), next to the records."""
    src = getattr(spec, "source", None)
    text = None
    if src is not None and Path(src).exists():
        text = Path(src).read_text()
    elif hasattr(spec, "model_dump"):
        import yaml

        text = yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False)
    if text is not None:
        write_text_atomic(round_dir / "spec.yaml", text)


def spec_labels(spec: Any) -> tuple[list[str], list[str]]:
    """Task labels and every candidate name of the spec (for the study's categorical choices)."""
    names = {c.name for label in spec.tasks for c in spec.candidates(label)}
    return list(spec.tasks), sorted(names)
