"""The schedulers of a round: the one round loop (orchestrator.loop) with its claim strategy
(orchestrator.claim_strategy), chosen by the round's storage.

    RoundScheduler    one scheduler, its study on SQLite: the round lock keeps others out; records.jsonl is the truth,
                      and on start `RoundStudy.reconcile` tells RUNNING trials whose run has a record, keeps the others
                      for adoption, and mirrors records that have no trial.
    SharedScheduler   one worker of a round on PostgreSQL (`fsearch worker`; `fsearch round --storage postgresql://...`
                      runs one in process as the coordinator): each unit is first claimed in the database
                      (orchestrator.claims: row-locked, heartbeat thread, takeover after the owner's timeout), its
                      record committed there while the claim is held, and the trial a dead worker left RUNNING adopted
                      by the unit's next owner. Stage barriers are the planner's: a unit is runnable only once the
                      records it depends on exist.
    WorkerPool        `fsearch round --workers N` (orchestrator.pool).
SQLite serves one scheduler: several workers on it are refused (orchestrator.study.require_shared_storage).

Test hooks (environment):
  FSEARCH_WORKER_CMD  the worker command (shlex-split; the run file is appended), default `python -m worker`
  FSEARCH_FAULTS      JSON {"<fnmatch pattern on run_key>": "<fault>"} -> RunConfig.fault
  FSEARCH_KILL_AT     "point:n[,point:n]": SIGKILL this scheduler the n-th time it reaches `point` (orchestrator.faults)

This module also names what the CLI and the tests use from the modules it is built of. Torch-free.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.claim_strategy import LocalStrategy, SharedStrategy, save_spec_copy, spec_labels, spec_text
from orchestrator.claims import HEARTBEAT_S, STALE_AFTER_S, WAIT_S, RoundClaims, worker_name
from orchestrator.faults import FAULTS_ENV, KILL_ENV, KILL_POINTS, KillPoints, RoundEvents, fault_for, parse_faults
from orchestrator.fileio import write_text_atomic
from orchestrator.loop import ActiveRun, NullDisplay, ProbeFailed, RoundLoop, RunStart, next_attempt
from orchestrator.outcomes import RETRYABLE, AttemptLog, Outcome, classify, halve_micro_batch, log_tail, read_result
from orchestrator.pool import WorkerPool, pool_devices
from orchestrator.processes import (POLL_S, TERM_GRACE_S, WORKER_CMD_ENV, WorkerProcess, bytecode_cache_dir,
                                    kill_leftover_worker, read_progress, start_worker, worker_command,
                                    worker_environment)
from orchestrator.round_errors import ClaimLost, RoundLocked, SchedulerError
from orchestrator.study import default_storage_url, is_shared_storage, require_shared_storage

__all__ = [
    "FAULTS_ENV", "KILL_ENV", "KILL_POINTS", "POLL_S", "RETRYABLE", "TERM_GRACE_S", "WORKER_CMD_ENV", "ActiveRun",
    "AttemptLog", "ClaimLost", "KillPoints", "NullDisplay", "Outcome", "ProbeFailed", "RoundEvents", "RoundLocked",
    "RoundScheduler", "RunStart", "SchedulerError", "SharedScheduler", "WorkerPool", "WorkerProcess",
    "bytecode_cache_dir", "classify", "fault_for", "halve_micro_batch", "kill_leftover_worker", "log_tail",
    "next_attempt", "parse_faults", "pool_devices", "read_progress", "read_result", "save_spec_copy",
    "scheduler_for", "spec_labels", "spec_text", "start_worker", "worker_command", "worker_environment",
    "write_text_atomic",
]

SHARED_ONLY = ("coordinator", "worker_id", "heartbeat_s", "stale_after_s", "wait_s")


class RoundScheduler(RoundLoop):
    """Runs one round to completion (or until interrupted). Single worker, one GPU; its study on SQLite (a PostgreSQL
    round runs through SharedScheduler: `scheduler_for`)."""

    shared = False

    def __init__(self, spec: Any, **kw: Any):
        super().__init__(spec, **kw)
        if is_shared_storage(self.storage_url):
            raise SchedulerError("a round on PostgreSQL runs through SharedScheduler (scheduler_for), whose claims "
                                 "keep several workers apart")
        self.strategy = LocalStrategy(self)


class SharedScheduler(RoundLoop):
    """One of any number of workers of a round whose study lives in PostgreSQL (`fsearch worker`, and
    `fsearch round --storage postgresql://...`), on any number of hosts.

    Each loop: the round's records from the database -> the planner -> the first runnable unit no live claim holds is
    claimed atomically -> run under a heartbeat thread -> record committed to the database with the claim still held
    -> trial told -> claim done. When every runnable unit is held by others the worker waits (`wait_s`) and plans
    again; it exits when the plan has nothing left. A worker whose claim was taken over (it fell silent past the
    timeout) kills its run and records nothing."""

    shared = True

    def __init__(self, spec: Any, *, coordinator: bool = False, worker_id: str | None = None,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S, wait_s: float = WAIT_S,
                 **kw: Any):
        super().__init__(spec, **kw)
        require_shared_storage(self.storage_url, "a round shared by several workers")
        if not (heartbeat_s > 0 and stale_after_s >= 2 * heartbeat_s):
            raise SchedulerError(f"stale-after {stale_after_s:g} s must be at least twice the heartbeat interval "
                                 f"({heartbeat_s:g} s), or a live worker loses its claims")
        self.strategy = self.shared_strategy = SharedStrategy(
            self, coordinator=coordinator, worker_id=worker_id or worker_name(), heartbeat_s=heartbeat_s,
            stale_after_s=stale_after_s, wait_s=wait_s)

    # the claim settings, as the CLI and the worker pool read them
    @property
    def coordinator(self) -> bool:
        return self.shared_strategy.coordinator

    @property
    def worker_id(self) -> str:
        return self.shared_strategy.worker_id

    @property
    def heartbeat_s(self) -> float:
        return self.shared_strategy.heartbeat_s

    @property
    def stale_after_s(self) -> float:
        return self.shared_strategy.stale_after_s

    @property
    def wait_s(self) -> float:
        return self.shared_strategy.wait_s

    @property
    def claims(self) -> RoundClaims | None:
        return self.shared_strategy.claims

    # what a worker pool's coordinator does without running units itself
    def prepare(self) -> None:
        """Open the study and the claim tables, publish the spec, read and mirror the records, repair trials."""
        self.study, self.records = self.shared_strategy.open()

    def refresh(self) -> None:
        self.records = self.shared_strategy.refresh(self.records)

    def sync_ledger(self) -> None:
        self.shared_strategy.sync_ledger()

    def stored_probes(self) -> dict[str, dict[str, Any]]:
        return self.shared_strategy.stored_probes()


def scheduler_for(spec: Any, **kw: Any) -> RoundLoop:
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

