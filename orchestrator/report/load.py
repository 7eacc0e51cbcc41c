"""Reading a round folder for the report: its records (typed), spec, and each run's validation curve."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError
from orchestrator.paths import METRICS, RoundPaths
from orchestrator.records import Ledger, LedgerError, Record


class ReportError(UserError):
    """The round folder cannot be reported on (no records, unreadable ledger): one line."""


@dataclass
class RoundData:
    round_dir: Path
    records: list[Record]
    records_sha256: str
    spec: Any | None  # orchestrator.spec.Spec
    spec_sha256: str | None
    spec_error: str | None
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # run_key -> metrics.jsonl rows
    curve_files: dict[str, str] = field(default_factory=dict)  # run_key -> metrics.jsonl path found


def load_round(round_dir: Path) -> RoundData:
    round_dir = Path(round_dir)
    paths = RoundPaths(round_dir)
    if not paths.records.exists():
        raise ReportError(f"{round_dir}: no records.jsonl (has the round run?)")
    try:
        records = Ledger(paths.records).read()
    except LedgerError as e:
        raise ReportError(str(e)) from None
    raw = paths.records.read_bytes()
    spec = spec_sha = spec_error = None
    if paths.spec.exists():
        from orchestrator.spec import SpecError, parse_spec_text

        text = paths.spec.read_text(encoding="utf-8")
        spec_sha = hashlib.sha256(text.encode()).hexdigest()
        try:
            spec = parse_spec_text(text, str(paths.spec))
        except SpecError as e:
            spec_error = str(e)
    data = RoundData(round_dir, records, hashlib.sha256(raw).hexdigest(), spec, spec_sha, spec_error)
    for rec in records:
        metrics = find_metrics_file(paths, rec)
        if metrics is not None:
            data.curves[rec.run_key] = read_metrics_rows(metrics)
            data.curve_files[rec.run_key] = str(metrics)
    return data


def find_metrics_file(paths: RoundPaths, rec: Record) -> Path | None:
    """A run's metrics.jsonl: under the run_dir its record names (absolute, or relative to the working folder, the
    round, the results root or the project), else in the round's own runs/ folder."""
    tries = []
    if rec.run_dir:
        run_dir = Path(rec.run_dir)
        root = paths.root
        tries = [run_dir] if run_dir.is_absolute() else [Path.cwd() / run_dir, root / run_dir,
                                                         root.parent / run_dir, root.parent.parent / run_dir]
    tries.append(paths.runs / rec.run_key / f"attempt-{rec.attempt}")
    for d in tries:
        if (d / METRICS).is_file():
            return d / METRICS
    return None


def read_metrics_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # a torn last line (the run was cut short while writing)
            raise ReportError(f"{path}: line {i + 1} is not JSON") from None
    return rows
