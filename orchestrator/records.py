"""The round's ledger: one JSON line per run (its final outcome after retries) in <round>/records.jsonl.

The ledger is the source of truth of a round on SQLite; the Optuna study mirrors it. On a shared (PostgreSQL)
storage the database's records table is the truth (orchestrator.claims) and this file is each host's mirror, kept by
`append_missing` under the same lock. Crash safety:
- `Ledger.append` writes one complete line (`json + "\\n"`) under a file lock, then flush + fsync. A record counts as
  written once its newline is on disk.
- `Ledger.read` ignores a torn or undecodable *last* line (a write cut short by a crash); a bad line followed by more
  lines is corruption and raises `LedgerError` naming the line number.
- `append` first removes such a torn tail, so the next record starts on a fresh line, and refuses a second record
  for a run key that already has one (a run is recorded once).

Torch-free.
"""
from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.errors import UserError, one_line
from orchestrator.fileio import fsync_dir

SCHEMA = 1
LOCK_TIMEOUT_S = 60.0

Status = Literal["ok", "diverged", "failed"]
Decision = Literal["baseline", "promote", "prune", "recorded", "failed", "diverged"]


class LedgerError(UserError):
    """The ledger file is corrupt (a bad line in the middle) or a record would be duplicated."""


class Record(BaseModel):
    """One run's final outcome. Also the column set of `fsearch export` (jsonl, csv, parquet)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    schema_version: int = Field(SCHEMA, alias="schema")
    round: str
    task: str  # the spec's task label
    task_kind: str  # the task registry name
    stage: str
    candidate: str
    mode: str  # baseline | prompt_fs | read_twice
    seed: int
    run_key: str
    attempt: int  # the attempt that produced this outcome (0 = first)
    fs: dict[str, Any] | None = None
    batch_size: int  # effective batch (examples per optimizer step)
    micro_batch: int  # examples per forward (after any OOM halving)
    grad_accum: int
    steps: int  # optimizer steps completed
    budget_steps: int
    eval_every: int
    n_val: int
    data_seed: int
    status: Status
    error_kind: str | None = None
    error_message: str | None = None
    metric: str  # the decision metric's name (the task's primary unless the spec names another)
    value: float | None = None  # final validation value of `metric`
    final: dict[str, float | None] = Field(default_factory=dict)
    best: dict[str, float | None] = Field(default_factory=dict)  # every metric of ONE eval
    best_step: int | None = None
    test: dict[str, float | None] = Field(default_factory=dict)
    baseline_key: str | None = None  # run key of the matched baseline (None for baselines)
    baseline_value: float | None = None
    delta: float | None = None  # value - baseline_value
    threshold: float | None = None
    decision: Decision
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    peak_mem_bytes: int | None = None
    first_step_s: float | None = None  # worker start to the end of the first optimizer step (start-up cost)
    device: str | None = None
    compiled: bool | None = None  # the training forwards ran torch.compile'd blocks (spec defaults.compile)
    step_mode: str | None = None  # "off", "on", "graphs" or "eager-graphs": how the training step ran (spec defaults.compile)
    sandbox: str | None = None  # "enforced" or "unsafe": how model-written code was executed (spec defaults.sandbox)
    # what the run's seed varied: "data_order", and "init" where a from-scratch model's initialisation followed it
    # (None: recorded before the field existed, when every from-scratch seed shared init seed 0)
    seed_controls: list[str] | None = None
    run_dir: str
    finished_at: str  # ISO-8601 UTC
    best_val_loss: float | None = None  # the original's field names, taken from `best` (the same eval)
    best_val_tok_acc: float | None = None

    @field_validator("value", "baseline_value", "delta", "best_val_loss", "best_val_tok_acc", "threshold")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        return v if v is None or math.isfinite(v) else None

    def to_line(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=False, allow_nan=False)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_columns() -> list[str]:
    """Field names as they appear in the JSON lines and in exports."""
    return [f.alias or name for name, f in Record.model_fields.items()]


class Ledger:
    """Append-only JSONL file of `Record`s."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = FileLock(str(self.path) + ".lock", timeout=LOCK_TIMEOUT_S)

    # reading ---------------------------------------------------------------------------------------------------------
    def read(self) -> list[Record]:
        if not self.path.exists():
            return []
        records, _ = self._parse(self.path.read_bytes())
        return records

    def _parse(self, data: bytes) -> tuple[list[Record], int]:
        """Records of the file's complete lines and the byte length of its valid prefix (a torn tail excluded)."""
        records: list[Record] = []
        lines = data.split(b"\n")
        # the element after the last newline is empty (clean file) or a torn write
        complete, tail = lines[:-1], lines[-1]
        valid_len = 0
        offset = 0
        last_content = max((i for i, ln in enumerate(complete) if ln.strip()), default=-1)
        for i, raw in enumerate(complete):
            line_end = offset + len(raw) + 1
            if raw.strip():
                try:
                    records.append(Record.model_validate_json(raw))
                except (ValidationError, ValueError) as e:
                    if i == last_content and not tail.strip():
                        break  # an undecodable last line: a write cut short, ignored (removed on the next append)
                    raise LedgerError(f"{self.path}: line {i + 1} is not a valid record: {one_line(e)}") from None
            valid_len = line_end
            offset = line_end
        return records, valid_len

    def run_keys(self) -> set[str]:
        return {r.run_key for r in self.read()}

    # writing ---------------------------------------------------------------------------------------------------------
    def append(self, record: Record) -> None:
        """Append one record (lock, torn-tail repair, fsync); a run key the file already has is an error."""
        if not self.append_missing([record]):
            raise LedgerError(f"{self.path}: run {record.run_key} already has a record")

    def append_missing(self, records: list[Record]) -> list[Record]:
        """Append, in the given order, the records whose run key the file does not have yet (one lock, one fsync);
        returns those appended. The mirror of a shared round: several workers, on one host or several, keep their
        host's file equal to the database's records this way."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            new_file = not self.path.exists()
            with open(self.path, "ab+") as f:
                f.seek(0)
                existing, valid_len = self._parse(f.read())
                have = {r.run_key for r in existing}
                missing = []
                for r in records:
                    if r.run_key not in have:
                        have.add(r.run_key)
                        missing.append(r)
                if not missing:
                    return []
                if valid_len != f.seek(0, os.SEEK_END):
                    f.truncate(valid_len)
                f.seek(0, os.SEEK_END)
                f.write(b"".join(r.to_line().encode() + b"\n" for r in missing))
                f.flush()
                os.fsync(f.fileno())
            if new_file:
                fsync_dir(self.path.parent)
        return missing

    def write_torn(self, record: Record, fraction: float = 0.5) -> None:
        """Test hook: write the first part of a record's line without its newline (what a crash mid-write leaves)."""
        line = record.to_line().encode()
        with self._lock, open(self.path, "ab") as f:
            f.write(line[: max(1, int(len(line) * fraction))])
            f.flush()
            os.fsync(f.fileno())

