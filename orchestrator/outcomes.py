"""How a worker's attempt ended, and what the loop does about it: classify an attempt from its result.json (written
atomically by the worker) or, without one, its exit code; keep a run's attempt history; halve the micro-batch after an
out-of-memory. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.paths import RESULT
from orchestrator.runconfig import EXIT_KIND, EXIT_OK, RunResult

ERROR_TAIL_LINES = 4  # log lines kept as the error message when a worker dies without result.json

# retried up to `retries` ("lost": a shared round's worker died mid-run and another took its unit over);
# oom halves the micro-batch; data/config fail at once
RETRYABLE = ("crash", "timeout", "lost")


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
        return RunResult.model_validate_json((run_dir / RESULT).read_bytes())
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
