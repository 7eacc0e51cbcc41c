"""Fault injection for the crash-safety tests, kept out of the round loop.

The loop reports where it stands through one seam: `RoundEvents.reached(point, **context)` at each moment named in
KILL_POINTS. The default observer does nothing. `KillPoints` (installed from FSEARCH_KILL_AT by `events_from_env`) is
the observer the tests use: it SIGKILLs this process the n-th time it reaches a named point, so a test can stop a
scheduler exactly between two steps of a run and check that the next one resumes it.

Worker-side faults (FSEARCH_FAULTS: a pattern on the run key -> the fault a worker plays, e.g. crash or oom) go into
RunConfig.fault; the worker acts them out (orchestrator.runconfig.Fault).

Torch-free.
"""
from __future__ import annotations

import fnmatch
import os
import signal
import sys
from typing import Any, get_args

from orchestrator.errors import json_object
from orchestrator.round_errors import SchedulerError
from orchestrator.runconfig import Fault

FAULTS_ENV = "FSEARCH_FAULTS"
KILL_ENV = "FSEARCH_KILL_AT"

# the moments the round loop reports (and FSEARCH_KILL_AT can stop at), in the order a run meets them
KILL_POINTS = (
    "stage",  # the next unit starts a new (task, stage): before it is claimed
    "claim",  # trial created (RUNNING), nothing spawned yet
    "spawn",  # worker process started
    "run",  # worker running and has written progress.json
    "outcome",  # worker finished and its outcome is classified; nothing recorded yet
    "torn_record",  # the record is about to be appended (a kill here leaves half its line: a crash mid-write)
    "record",  # record appended and fsynced; the trial not yet told
    "tell",  # trial told: between two runs
    "probe",  # batch probe result written, not yet stored in the study
)


class RoundEvents:
    """What the round loop tells an observer: `reached(point, **context)` at each point of KILL_POINTS. The default
    does nothing; context is what an observer may act on at that point (`ledger` and `record` at torn_record)."""

    def reached(self, point: str, **context: Any) -> None:
        """Called by the loop at `point`; the base observer ignores it."""


class KillPoints(RoundEvents):
    """SIGKILL this process the n-th time it reaches a named point (FSEARCH_KILL_AT="record:3,claim:1").

    At torn_record the kill first writes half of the record's line to the ledger: what a crash in the middle of the
    append leaves behind, which the ledger must repair."""

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

    def reached(self, point: str, **context: Any) -> None:
        if not self.due(point):
            return
        if point == "torn_record" and context.get("ledger") is not None:
            context["ledger"].write_torn(context["record"])
        self.die()

    def hit(self, name: str) -> None:
        self.reached(name)

    @staticmethod
    def die() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def events_from_env() -> RoundEvents:
    """The loop's observer: kill points when FSEARCH_KILL_AT is set, else the no-op observer."""
    return KillPoints.from_env() if os.environ.get(KILL_ENV) else RoundEvents()


def parse_faults(text: str | None) -> dict[str, str]:
    """FSEARCH_FAULTS: a JSON object {fnmatch pattern on the run key: fault}."""
    if not text:
        return {}
    faults = json_object(text, FAULTS_ENV, SchedulerError, "a JSON object {pattern: fault}")
    for pattern, fault in faults.items():
        if fault not in get_args(Fault):
            raise SchedulerError(f"{FAULTS_ENV}: fault {fault!r} for {pattern!r} is not one of {get_args(Fault)}")
    return faults


def faults_from_env() -> dict[str, str]:
    return parse_faults(os.environ.get(FAULTS_ENV))


def fault_for(run_key: str, faults: dict[str, str]) -> str | None:
    """The fault of the first pattern that matches the run key, or None."""
    for pattern, fault in faults.items():
        if fnmatch.fnmatchcase(run_key, pattern):
            return fault
    return None
