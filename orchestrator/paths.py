"""Where things live in a round folder and in a run's folder: the one place that names these files.

    <output>/<round>/
        spec.yaml          the spec the round runs (written once; a changed spec is a new round)
        records.jsonl      the ledger: one JSON line per finished or failed run
        study.db           the Optuna study (SQLite storage; PostgreSQL rounds keep it in the database)
        storage.json       the storage URL the round last ran with, without its password
        round.lock         held by the one scheduler of a local round
        scheduler.pid      that scheduler's process id (read by `fsearch status`)
        probe/<task>.json  the batch probe's result per task
        runs/<run key>/attempt-N/   one folder per attempt of a run (below)
        workers/           per-worker logs of a multi-worker round; warm-worker.<pid>.log: what a warm worker
                           process printed outside its runs, one file per scheduler process
        report/            report.md, summary.json, summary.txt, plots
        export/            `fsearch export` output

    attempt-N/
        run.json           the RunConfig the worker was given
        config.json        the config as the worker read it (plus interpreter and pid)
        metrics.jsonl      one line per evaluation
        progress.json      the worker's latest step (for the live display)
        result.json        the RunResult
        worker.log         the worker's stdout and stderr
        worker.pid         the worker's process id (a resumed scheduler kills a leftover worker)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPEC = "spec.yaml"
RECORDS = "records.jsonl"
STUDY_DB = "study.db"
STORAGE = "storage.json"
LOCK = "round.lock"
SCHEDULER_PID = "scheduler.pid"

RUN_CONFIG = "run.json"
WORKER_CONFIG = "config.json"
METRICS = "metrics.jsonl"
PROGRESS = "progress.json"
RESULT = "result.json"
WORKER_LOG = "worker.log"
WORKER_PID = "worker.pid"

# files whose presence marks a folder as a round folder
ROUND_MARKERS = (RECORDS, SPEC, STUDY_DB, LOCK, STORAGE)


@dataclass(frozen=True)
class RoundPaths:
    root: Path

    @property
    def spec(self) -> Path:
        return self.root / SPEC

    @property
    def records(self) -> Path:
        return self.root / RECORDS

    @property
    def study_db(self) -> Path:
        return self.root / STUDY_DB

    @property
    def storage(self) -> Path:
        return self.root / STORAGE

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def scheduler_pid(self) -> Path:
        return self.root / SCHEDULER_PID

    @property
    def probe_dir(self) -> Path:
        return self.root / "probe"

    def probe(self, task: str) -> Path:
        return self.probe_dir / f"{task}.json"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def workers(self) -> Path:
        return self.root / "workers"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def is_round(self) -> bool:
        return self.root.is_dir() and any((self.root / m).exists() for m in ROUND_MARKERS)
