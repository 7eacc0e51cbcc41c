"""The round loop: ask the planner, run one unit in a worker subprocess, record it, repeat. Resume = run it again.

Per run (one study trial, one ledger record):
    claim the unit (orchestrator.claim_strategy) -> its trial (new, RUNNING, user attrs run_key/attempt/micro_batch;
    or the RUNNING trial an interrupted run left, adopted)
    for each attempt:  set trial attrs (attempt, micro_batch) -> write attempt-<n>/run.json -> spawn the worker
                       (own process group, dies with the scheduler, time limit) -> wait -> classify
                       -> append to the trial's attempt history -> retry (oom: halve the micro-batch, same effective
                       batch; crash/timeout: up to `retries`) or stop (ok, diverged, data, config, retries spent)
    commit the record (the strategy makes it the round's truth) -> tell the trial (user attrs, state, value)

The planner never returns a recorded run, so a finished run is never rerun and never recorded twice. What differs
between one scheduler and several workers (locking, claiming, where the truth lives) is the claim strategy's; the
loop reports each moment of a run to an observer (orchestrator.faults.RoundEvents), through which the crash-safety
tests stop it.

Torch-free.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.claim_strategy import ClaimStrategy
from orchestrator.faults import RoundEvents, events_from_env, fault_for, faults_from_env
from orchestrator.fileio import write_text_atomic
from orchestrator.outcomes import RETRYABLE, AttemptLog, Outcome, classify, halve_micro_batch, log_tail
from orchestrator.paths import RUN_CONFIG, WORKER_LOG, WORKER_PID, RoundPaths
from orchestrator.processes import (POLL_S, TERM_GRACE_S, WarmWorker, kill_leftover_worker, read_progress,
                                    start_worker, worker_command, worker_environment, worker_pid_line)
from orchestrator.records import Ledger, Record, utc_now
from orchestrator.round_errors import SchedulerError
from orchestrator.runconfig import EXIT_KIND, EXIT_OK, PROBE_FILE, RunConfig
from orchestrator.study import RoundStudy, default_storage_url

PROBE_TIME_LIMIT_S = 1800.0  # the batch probe: model build + a few forward/backward passes per size


@dataclass
class RunStart:
    """How a run begins in this process: its trial, attempt history and micro-batch; attempt numbers from
    `first_attempt` on (another host may have used lower ones); `over`: the run already has its final outcome."""

    number: int
    log: AttemptLog
    micro_batch: int
    first_attempt: int = 0
    over: Outcome | None = None


@dataclass
class ActiveRun:
    """What the display needs to know about the run in progress."""

    unit: Any
    attempt: int
    micro_batch: int
    run_dir: Path
    started: float
    progress: dict[str, Any] = field(default_factory=dict)


class ProbeFailed(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


class NullDisplay:
    def round_started(self, sched: "RoundLoop") -> None: ...
    def run_started(self, sched: "RoundLoop", active: ActiveRun) -> None: ...
    def run_progress(self, sched: "RoundLoop", active: ActiveRun) -> None: ...
    def run_finished(self, sched: "RoundLoop", record: Record) -> None: ...
    def round_finished(self, sched: "RoundLoop") -> None: ...
    def message(self, text: str) -> None: ...


class RoundLoop:
    """Runs one round to completion (or until interrupted) with the claim strategy a subclass installs
    (orchestrator.scheduler: RoundScheduler, SharedScheduler)."""

    strategy: ClaimStrategy

    def __init__(self, spec: Any, *, round_dir: Path | None = None, storage_url: str | None = None,
                 worker_cmd: str | list[str] | None = None, display: Any = None, devices: str | None = None,
                 poll_s: float = POLL_S, term_grace_s: float = TERM_GRACE_S, events: RoundEvents | None = None):
        from orchestrator import planner as planner_mod

        self.planner = planner_mod
        self.spec = spec
        self.round_dir = Path(round_dir or spec.round_dir)
        self.paths = RoundPaths(self.round_dir)
        self.storage_url = storage_url or getattr(spec, "storage", None) or default_storage_url(self.round_dir)
        self.probes: dict[str, dict[str, Any]] = {}
        self.worker_cmd = worker_command(worker_cmd)
        self.faults = faults_from_env()
        self.events = events if events is not None else events_from_env()
        self.display = display or NullDisplay()
        self.devices = devices
        self.poll_s = poll_s
        self.term_grace_s = term_grace_s
        self.ledger = Ledger(self.paths.records)
        self.study: RoundStudy | None = None
        self.records: list[Record] = []
        self.recorded_here: list[Record] = []
        self.active: ActiveRun | None = None
        self.warm: WarmWorker | None = None  # spec defaults.worker: warm
        self._last_stage: tuple[str, str] | None = None

    # top level ------------------------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the round's lock where the strategy has one: RoundLocked if another scheduler runs this round."""
        self.strategy.acquire()

    def release(self) -> None:
        self.strategy.release()

    def run(self) -> list[Record]:
        """Run the round to its end (taking the lock unless `acquire` did); returns every record of the round."""
        self.acquire()
        previous = signal.getsignal(signal.SIGTERM)
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread:  # SIGTERM ends a round like Ctrl-C: the worker's group is killed, the trial is resumed later
            signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
        try:
            return self.run_round()
        finally:
            if self.warm is not None:
                self.warm.close()
                self.warm = None
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
            self.release()

    def run_round(self) -> list[Record]:
        self.study, self.records = self.strategy.open()
        self.probes = self.strategy.ensure_probes()
        self.display.round_started(self)
        waiting = False
        while True:
            self.records = self.strategy.refresh(self.records)
            plan = self.plan()
            if not plan.runnable:
                break
            self.enter_stage(plan.runnable[0])
            claim = self.strategy.claim(plan.runnable)
            if claim is None:
                if not waiting:
                    self.display.message(f"waiting: the {len(plan.runnable)} runnable unit(s) are held by other "
                                         f"workers; looking again every {self.strategy.wait_s:g} s")
                waiting = True
                time.sleep(self.strategy.wait_s)
                continue
            waiting = False
            record = None
            with self.strategy.holding(claim):
                record = self.execute(claim.unit)
            if record is not None:
                self.recorded_here.append(record)
        self.strategy.finish()
        self.display.round_finished(self)
        return self.records

    def enter_stage(self, unit: Any) -> None:
        stage_id = (unit.task, unit.stage)
        if self._last_stage is not None and stage_id != self._last_stage:
            self.events.reached("stage")
        self._last_stage = stage_id

    def plan(self) -> Any:
        return self.planner.plan(self.spec, self.records, batch_sizes=self.batch_sizes())

    def batch_sizes(self) -> dict[str, int]:
        """Effective batch of every `batch: auto` task: the probe's micro-batch (no accumulation)."""
        return {task: int(p["micro_batch"]) for task, p in self.probes.items()}

    # one run --------------------------------------------------------------------------------------------------------
    def execute(self, unit: Any) -> Record:
        assert self.study is not None
        runs_dir = self.paths.runs / unit.run_key
        start = self.open_run(unit, runs_dir)
        self.events.reached("claim")
        if start.over is not None:  # ended before any attempt here (its lost attempts used up the retries)
            attempt = max(0, start.first_attempt - 1)
            attempt_dir = runs_dir / f"attempt-{attempt}"
            cfg, outcome = self.base_config(unit, attempt_dir, attempt, start.micro_batch), start.over
        else:
            cfg, outcome, attempt_dir = self.run_attempts(unit, runs_dir, start)
        record = self.make_record(unit, cfg, outcome, attempt_dir)
        self.events.reached("torn_record", ledger=self.ledger, record=record)
        self.strategy.commit(record)
        self.events.reached("record")
        self.study.finish(start.number, record)
        self.records.append(record)
        self.strategy.told(record)
        self.events.reached("tell")
        self.display.run_finished(self, record)
        return record

    def open_run(self, unit: Any, runs_dir: Path) -> RunStart:
        """The run's trial: the RUNNING one an interrupted run left (adopted), else a new one."""
        micro_batch = self.first_micro_batch(unit, runs_dir)
        number = self.strategy.trial_to_adopt(unit.run_key)
        if number is None:
            number = self.new_trial(unit, runs_dir, micro_batch, **self.strategy.new_trial_attrs())
            return RunStart(number, AttemptLog(), micro_batch)
        start = self.adopt_trial(unit, number, runs_dir, micro_batch)
        self.strategy.adopted(unit, start)
        return start

    def first_micro_batch(self, unit: Any, runs_dir: Path) -> int:
        cfg = self.base_config(unit, runs_dir / "attempt-0", 0)
        return cfg.micro_batch or cfg.batch_size

    def new_trial(self, unit: Any, runs_dir: Path, micro_batch: int, **attrs: Any) -> int:
        assert self.study is not None
        cfg = self.base_config(unit, runs_dir / "attempt-0", 0)
        return self.study.claim(cfg.task, cfg.stage, cfg.candidate, cfg.seed,
                                {"run_key": unit.run_key, "attempt": 0, "micro_batch": micro_batch,
                                 "batch_size": cfg.batch_size, "attempts": [], **attrs})

    def adopt_trial(self, unit: Any, number: int, runs_dir: Path, micro_batch: int) -> RunStart:
        """Resume a run in its RUNNING trial: its attempt history, micro-batch and attempt count go on."""
        assert self.study is not None
        attrs = self.study.trial(number).user_attrs
        log = AttemptLog(list(attrs.get("attempts") or []))
        micro_batch = int(attrs.get("micro_batch") or micro_batch)
        first = int(attrs.get("attempt") or 0) + 1 if attrs.get("run_dir") else 0  # an attempt was started
        for d in sorted(runs_dir.glob("attempt-*")):
            kill_leftover_worker(d)
        finished = len(log.history)
        self.display.message(f"resuming {unit.run_key} (trial {number}): {finished} finished and "
                             f"{max(0, first - finished)} interrupted earlier attempt(s); next is attempt {first}")
        return RunStart(number, log, micro_batch, first)

    def run_attempts(self, unit: Any, runs_dir: Path, start: RunStart) -> tuple[RunConfig, Outcome, Path]:
        """Attempts until an outcome is final: oom halves the micro-batch, crash/timeout retry up to `retries`."""
        assert self.study is not None
        run_key, number, log, micro_batch = unit.run_key, start.number, start.log, start.micro_batch
        while True:
            self.strategy.check(confirm=True)
            attempt = max(next_attempt(runs_dir), start.first_attempt)
            attempt_dir = runs_dir / f"attempt-{attempt}"
            cfg = self.base_config(unit, attempt_dir, attempt, micro_batch)
            self.study.set_attrs(number, {"attempt": attempt, "micro_batch": micro_batch, "run_dir": str(attempt_dir)})
            outcome = self.run_attempt(unit, cfg, attempt_dir)
            self.strategy.check(confirm=True)
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

    def warm_worker(self) -> WarmWorker:
        """This scheduler's warm worker (spec `defaults.worker: warm`), made on first use."""
        if self.warm is None:
            # what the process prints outside its runs (start-up); one file per scheduler process
            log = self.paths.workers / f"warm-worker.{os.getpid()}.log"
            self.warm = WarmWorker(self.worker_cmd, log, env=self.worker_env())
        return self.warm

    def run_attempt(self, unit: Any, cfg: RunConfig, attempt_dir: Path) -> Outcome:
        attempt_dir.mkdir(parents=True, exist_ok=True)
        run_file = attempt_dir / RUN_CONFIG
        write_text_atomic(run_file, cfg.model_dump_json(indent=1))
        log_path = attempt_dir / WORKER_LOG
        limit = self.time_limit_for(unit)
        active = self.active = ActiveRun(unit, cfg.attempt, cfg.micro_batch or cfg.batch_size, attempt_dir,
                                         time.time())
        self.display.run_started(self, active)
        if self.spec.defaults.worker == "warm":
            proc = self.warm_worker().start(run_file, log_path)
        else:
            proc = start_worker(self.worker_cmd + [str(run_file)], log_path, env=self.worker_env())
        write_text_atomic(attempt_dir / WORKER_PID, worker_pid_line(proc.pid))
        self.events.reached("spawn")
        seen_progress = False

        def poll() -> None:
            nonlocal seen_progress
            self.strategy.check()
            prog = read_progress(attempt_dir)
            if prog is not None:
                active.progress = prog
                if not seen_progress:
                    seen_progress = True
                    self.events.reached("run")
            self.display.run_progress(self, active)

        try:
            code = proc.wait(limit, poll=poll, poll_s=self.poll_s, term_grace_s=self.term_grace_s)
        except BaseException:
            proc.kill()
            raise
        finally:
            self.active = None
        outcome = classify(attempt_dir, code, proc.timed_out, log_path, limit)
        self.events.reached("outcome")
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
            first_step_s=res.first_step_s if res is not None else None,
            device=res.device if res is not None else None, compiled=res.compiled if res is not None else None,
            step_mode=res.step_mode if res is not None else None,
            sandbox=res.sandbox if res is not None else None, seed_controls=cfg.seed_controls,
            run_dir=str(attempt_dir), finished_at=utc_now(),
            best_val_loss=best.get("val_loss"), best_val_tok_acc=best.get("val_tok_acc"),
        )

    # batch probe ----------------------------------------------------------------------------------------------------
    def probe_task(self, task: str) -> dict[str, Any]:
        """The micro-batch of a `batch: auto` task: the worker's GPU probe, or defaults.probe.cpu_batch on a CPU
        round (and on an `auto` round whose probe cannot run for want of a GPU)."""
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
        largest = max(self.spec.defaults.probe.micro_batches)
        units = self.planner.plan(self.spec, self.records, batch_sizes={**self.batch_sizes(), task: largest}).runnable
        base = next(u for u in units if u.task == task and u.is_baseline)

        def weight(c: Any) -> tuple[int, int]:
            if c.fs is not None:
                return (3 if not c.fs.detach else 2, 1 if c.fs.variant != "scalar" else 0)
            return (1 if c.mode == "read_twice" else 0, 0)

        heaviest = max(self.spec.candidates(task), key=weight, default=None)
        unit = dataclasses.replace(base, candidate=heaviest) if heaviest is not None else base
        return unit.run_config(run_dir=str(self.paths.probe_dir / task), micro_batch=None,
                               fault=fault_for(f"{task}.probe", self.faults))

    def run_probe(self, task: str, request: dict[str, Any]) -> dict[str, Any]:
        work = self.paths.probe_dir / task
        work.mkdir(parents=True, exist_ok=True)
        probe_file = work / PROBE_FILE
        (work / "probe_result.json").unlink(missing_ok=True)
        write_text_atomic(probe_file, json.dumps(request, indent=1))
        self.display.message(f"{task}: batch probe over micro-batches {request['candidates']}")
        if self.spec.defaults.worker == "warm":  # in the process the runs will use: its start-up is paid once
            proc = self.warm_worker().start(probe_file, work / WORKER_LOG)
        else:
            proc = start_worker(self.worker_cmd + ["--probe", str(probe_file)], work / WORKER_LOG,
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
            why = result.get("error_message") or log_tail(work / WORKER_LOG) or f"exit code {code}"
            raise ProbeFailed(kind, why)
        self.display.message(f"{task}: batch probe picked micro-batch {result['micro_batch']}")
        return result


def raise_keyboard_interrupt(signum: int, frame: Any) -> None:
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
