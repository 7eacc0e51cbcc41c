"""How the round loop (orchestrator.loop) gets its units and keeps its records: the claim strategy.

The loop is written once; what differs between a round run by one scheduler and a round shared by several workers is
behind this small interface (in the manner of Optuna's storages behind one Study):

    acquire / release      the round's file lock (one scheduler, or one coordinator of a shared round)
    open                   open the study, read the records, repair what a killed process left
    refresh                the round's records now (another worker may have added some)
    ensure_probes          the batch size of every `batch: auto` task, decided once per round
    claim                  the next unit to run, or None while other workers hold every runnable one
    holding                a context around running a claimed unit (heartbeat, giving it back when interrupted)
    trial_to_adopt         the RUNNING trial of a unit that an interrupted run left, if any
    adopted                what adopting that trial means here (a lost attempt counts as a retry)
    check                  stop here (ClaimLost) when the unit is no longer this process's
    commit                 make the record the round's truth
    told                   after the trial is told
    finish                 at the end of the round: no trial stays RUNNING

LocalStrategy: one scheduler; the round lock keeps others out, records.jsonl is the truth, the study (SQLite) mirrors
it. SharedStrategy: any number of workers on PostgreSQL; each unit is claimed in the database (orchestrator.claims),
its record committed there while the claim is held, records.jsonl is each host's mirror.

Torch-free.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import optuna
from filelock import FileLock, Timeout

from orchestrator.claims import DONE, PROBE_PREFIX, WAIT_S, Heartbeat, Lease, RoundClaims
from orchestrator.fileio import write_text_atomic
from orchestrator.outcomes import Outcome
from orchestrator.paths import RoundPaths
from orchestrator.records import Record
from orchestrator.round_errors import ClaimLost, RoundLocked, SchedulerError
from orchestrator.study import SPEC_ATTR, RoundStudy, redact_url

if TYPE_CHECKING:
    from orchestrator.loop import RoundLoop, RunStart


@dataclass
class Claim:
    """A unit this process may run now; `lease` is its database claim on a shared round."""

    unit: Any
    lease: Lease | None = None


class RoundLock:
    """The round folder's lock (non-blocking) and the pid file that tells `fsearch status` who holds it."""

    def __init__(self, round_dir: Path):
        self.paths = RoundPaths(round_dir)
        self.lock = FileLock(str(self.paths.lock))

    def acquire(self) -> None:
        """RoundLocked if another scheduler runs this round; nothing if this process holds it already."""
        if self.lock.is_locked:
            return
        self.paths.root.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise RoundLocked(f"round {self.paths.root} is already being run by another scheduler "
                              f"(lock {self.lock.lock_file} is held)") from None
        self.paths.scheduler_pid.write_text(f"{os.getpid()}\n")

    def release(self) -> None:
        if self.lock.is_locked:
            try:
                self.paths.scheduler_pid.unlink(missing_ok=True)
            finally:
                self.lock.release()


class ClaimStrategy:
    """The interface the round loop runs on (see the module docstring); `loop` is the round it serves."""

    wait_s: float = WAIT_S  # how long the loop waits when `claim` finds every runnable unit held

    def __init__(self, loop: "RoundLoop"):
        self.loop = loop
        self.round_lock = RoundLock(loop.round_dir)

    def acquire(self) -> None:
        self.round_lock.acquire()

    def release(self) -> None:
        self.round_lock.release()

    def open(self) -> tuple[RoundStudy, list[Record]]:
        raise NotImplementedError

    def refresh(self, records: list[Record]) -> list[Record]:
        return records

    def ensure_probes(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def claim(self, runnable: list[Any]) -> Claim | None:
        raise NotImplementedError

    @contextlib.contextmanager
    def holding(self, claim: Claim) -> Iterator[None]:
        yield

    def trial_to_adopt(self, run_key: str) -> int | None:
        raise NotImplementedError

    def adopted(self, unit: Any, start: "RunStart") -> None:
        """What adopting a RUNNING trial means beyond resuming its attempt history (nothing, by default)."""

    def new_trial_attrs(self) -> dict[str, Any]:
        return {}

    def check(self, confirm: bool = False) -> None:
        """Stop here (ClaimLost) when another worker has taken the unit over; `confirm`: ask the storage now."""

    def commit(self, record: Record) -> None:
        raise NotImplementedError

    def told(self, record: Record) -> None:
        """The run's trial is told."""

    def finish(self) -> None:
        raise NotImplementedError


class LocalStrategy(ClaimStrategy):
    """One scheduler (SQLite study): the round lock keeps others out, so the next unit of the plan is this one's;
    the ledger (records.jsonl) is the truth and the study is repaired from it on start (RoundStudy.reconcile)."""

    def __init__(self, loop: "RoundLoop"):
        super().__init__(loop)
        self.adoptable: dict[str, int] = {}  # run key -> RUNNING trial a killed scheduler left

    def open(self) -> tuple[RoundStudy, list[Record]]:
        loop = self.loop
        save_spec_copy(loop.spec, loop.round_dir)
        records = loop.ledger.read()
        study = RoundStudy.create_or_load(loop.storage_url, loop.spec.round)
        study.fix_choices(*spec_labels(loop.spec))
        self.adoptable = study.reconcile(records)
        return study, records

    def ensure_probes(self) -> dict[str, dict[str, Any]]:
        """Batch size of every `batch: auto` task, decided once per round and reused on resume: the worker's GPU probe
        (<round>/probe/<task>.json, also a study user attribute), or defaults.probe.cpu_batch on a CPU round."""
        loop = self.loop
        probes: dict[str, dict[str, Any]] = {}
        for task in [label for label, t in loop.spec.tasks.items() if t.batch == "auto"]:
            path = loop.paths.probe(task)
            used = [r.batch_size for r in loop.records if r.task == task]
            if path.exists():
                probes[task] = json.loads(path.read_text())
            elif used:  # the probe file is gone but the task already ran: keep the batch its records used
                probes[task] = {"micro_batch": used[-1], "source": "records (probe file missing)"}
            else:
                probes[task] = loop.probe_task(task)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, json.dumps(probes[task], indent=1))
                loop.events.reached("probe")
            if loop.study is not None and loop.study.study_attr(f"probe.{task}") != probes[task]:
                loop.study.set_study_attr(f"probe.{task}", probes[task])
        return probes

    def claim(self, runnable: list[Any]) -> Claim | None:
        return Claim(runnable[0])

    def trial_to_adopt(self, run_key: str) -> int | None:
        return self.adoptable.pop(run_key, None)

    def commit(self, record: Record) -> None:
        """Append the record to the ledger (the round's truth on a single-scheduler storage)."""
        self.loop.ledger.append(record)

    def finish(self) -> None:
        """A trial left RUNNING whose run the planner no longer returns (the spec changed) is failed."""
        assert self.loop.study is not None
        for key, number in sorted(self.adoptable.items()):
            self.loop.study.fail(number, f"run {key} is no longer part of the round's plan (the spec changed)")
        self.adoptable.clear()


class SharedStrategy(ClaimStrategy):
    """Any number of workers of a round whose study lives in PostgreSQL (see orchestrator.claims).

    Only a coordinator (`fsearch round`) takes the round lock; workers do not. The database's fsearch_records table is
    the round's truth; records.jsonl on each host is its mirror (appended under the ledger's file lock after each
    record, and on start and exit). A unit taken over from a dead worker is resumed in the same trial and its lost
    attempt counts as a crash retry."""

    def __init__(self, loop: "RoundLoop", *, coordinator: bool, worker_id: str, heartbeat_s: float,
                 stale_after_s: float, wait_s: float):
        super().__init__(loop)
        self.coordinator, self.worker_id = coordinator, worker_id
        self.heartbeat_s, self.stale_after_s, self.wait_s = heartbeat_s, stale_after_s, wait_s
        self.claims: RoundClaims | None = None
        self.lease: Lease | None = None

    def acquire(self) -> None:
        if self.coordinator:  # two coordinators of a round are refused; any number of workers may join
            super().acquire()

    def release(self) -> None:
        if self.coordinator:
            super().release()

    # set-up ---------------------------------------------------------------------------------------------------------
    def open(self) -> tuple[RoundStudy, list[Record]]:
        """Open the study and the claim tables, publish the spec, read the records, mirror them, repair trials."""
        loop = self.loop
        loop.round_dir.mkdir(parents=True, exist_ok=True)
        local = loop.ledger.read()  # before the database: the mirror never runs ahead of it
        loop.study = RoundStudy.create_or_load(loop.storage_url, loop.spec.round)
        self.claims = RoundClaims(loop.study.storage.engine, loop.spec.round, self.worker_id, self.stale_after_s)
        self.claims.ensure_tables()
        loop.study.fix_choices(*spec_labels(loop.spec))
        self.publish_spec()
        save_spec_copy(loop.spec, loop.round_dir, loop.study.study_attr(SPEC_ATTR))
        loop.records = self.refresh(loop.records)
        extra = sorted({r.run_key for r in local} - {r.run_key for r in loop.records})
        if extra:
            raise SchedulerError(
                f"{loop.ledger.path} has {len(extra)} record(s) that the storage {redact_url(loop.storage_url)} does "
                f"not (e.g. {extra[0]}): this round folder was run with another storage; use that storage, or "
                f"another results folder for this one")
        self.sync_ledger()
        self.repair_trials()
        return loop.study, loop.records

    def publish_spec(self) -> None:
        """Keep the spec in the study (workers started with only --round read it). A round is bound to its spec: the
        stored one is never replaced, and a spec that changes its runs is refused (coordinator and worker alike)."""
        loop = self.loop
        assert loop.study is not None
        text = spec_text(loop.spec)
        stored = loop.study.study_attr(SPEC_ATTR)
        if stored is None:
            loop.study.set_study_attr(SPEC_ATTR, text)
            return
        where = f"the study of round {loop.spec.round} ({redact_url(loop.storage_url)})"
        changes = spec_change(stored, loop.spec, where)
        if changes:
            hint = None if self.coordinator else "start this worker without --spec to use the round's"
            raise spec_changed_error(loop.spec, changes, where, hint)

    def refresh(self, records: list[Record]) -> list[Record]:
        assert self.claims is not None
        return self.claims.records()

    def sync_ledger(self) -> None:
        self.loop.ledger.append_missing(self.loop.records)

    def repair_trials(self, final: bool = False) -> None:
        """RUNNING trials whose run has a record are told from it (a worker died between record and tell; telling
        twice is harmless). At the end of the round, RUNNING trials without a record and without a live owner are
        failed (their run left the plan). Others stay RUNNING, to be adopted by the unit's next claim."""
        study = self.loop.study
        assert study is not None and self.claims is not None
        by_key = {r.run_key: r for r in self.loop.records}
        now, rows = self.claims.claims()
        owner_alive = {c.run_key for c in rows if c.state != DONE and c.fresh(now)}
        for t in study.running():
            key = t.user_attrs.get("run_key")
            if key in by_key:
                study.finish(t.number, by_key[key])
            elif final and key not in owner_alive:
                study.fail(t.number, f"run {key} is not part of the round's plan (the spec changed)")

    def finish(self) -> None:
        self.loop.records = self.refresh(self.loop.records)
        self.sync_ledger()
        self.repair_trials(final=True)

    # batch probes ---------------------------------------------------------------------------------------------------
    def ensure_probes(self) -> dict[str, dict[str, Any]]:
        """One probe per `batch: auto` task for the whole round: the study keeps the result; a worker that finds none
        claims the probe (key probe:<task>) and runs it, the others wait for it."""
        loop = self.loop
        probes: dict[str, dict[str, Any]] = {}
        for task in [label for label, t in loop.spec.tasks.items() if t.batch == "auto"]:
            probes[task] = self.shared_probe(task)
            path = loop.paths.probe(task)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, json.dumps(probes[task], indent=1))
        return probes

    def stored_probes(self) -> dict[str, dict[str, Any]]:
        """The probe results the study holds so far (what the coordinator of a worker pool plans with)."""
        loop = self.loop
        assert loop.study is not None
        attrs = loop.study.storage.get_study_user_attrs(loop.study.study_id)
        return {t: attrs[f"probe.{t}"] for t, ts in loop.spec.tasks.items()
                if ts.batch == "auto" and f"probe.{t}" in attrs}

    def shared_probe(self, task: str) -> dict[str, Any]:
        loop = self.loop
        assert loop.study is not None and self.claims is not None
        waiting = False
        while True:
            value = loop.study.study_attr(f"probe.{task}")
            if value is not None:
                return value
            lease = self.claims.try_claim(PROBE_PREFIX + task)
            if lease is None:
                if not waiting:
                    loop.display.message(f"{task}: waiting for the batch probe another worker runs")
                waiting = True
                time.sleep(self.wait_s)
                continue
            try:
                with Heartbeat(self.claims, lease, self.heartbeat_s):
                    value = loop.probe_task(task)
                    loop.events.reached("probe")
                    loop.study.set_study_attr(f"probe.{task}", value)
            except BaseException:
                self.claims.release(lease)
                raise
            self.claims.mark_done(lease)
            return value

    # one unit -------------------------------------------------------------------------------------------------------
    def claim(self, runnable: list[Any]) -> Claim | None:
        """The first runnable unit this worker could claim (in plan order), with its lease; None when all are held."""
        assert self.claims is not None
        busy = self.claims.busy_keys()
        for unit in runnable:
            if unit.run_key not in busy:
                lease = self.claims.try_claim(unit.run_key)
                if lease is not None:
                    return Claim(unit, lease)
        return None

    @contextlib.contextmanager
    def holding(self, claim: Claim) -> Iterator[None]:
        """Run the unit under a heartbeat. A lost claim ends the unit here without a record (the new owner runs it);
        an interruption or error gives the unit back at once (its trial stays RUNNING, to be adopted)."""
        assert self.claims is not None and claim.lease is not None
        lease, display = claim.lease, self.loop.display
        self.lease = lease
        if lease.stolen_from:
            display.message(f"{claim.unit.run_key}: taken over from worker {lease.stolen_from} (no heartbeat within "
                            f"its timeout, or its process is gone)")
        try:
            with Heartbeat(self.claims, lease, self.heartbeat_s):
                yield
        except ClaimLost as e:
            display.message(str(e))
        except optuna.exceptions.UpdateFinishedTrialError:  # the new owner finished the trial while this one slept
            display.message(f"{claim.unit.run_key}: another worker took this unit over and finished it; nothing "
                            f"recorded here")
        except BaseException:
            try:
                self.claims.release(lease)
            except Exception:  # noqa: BLE001 - the claim then goes stale and is taken over after the timeout
                pass
            raise
        finally:
            self.lease = None

    def trial_to_adopt(self, run_key: str) -> int | None:
        """The unit's RUNNING trial, if a worker left one; duplicates (two workers both created one) are failed."""
        study = self.loop.study
        assert study is not None
        trials = study.running_of(run_key)
        for t in trials[1:]:
            study.fail(t.number, f"duplicate RUNNING trial of run {run_key} (trial {trials[0].number} kept)")
        return trials[0].number if trials else None

    def new_trial_attrs(self) -> dict[str, Any]:
        return {"worker": self.worker_id}

    def adopted(self, unit: Any, start: "RunStart") -> None:
        """A unit taken over from a dead worker counts the lost attempt as a crash retry; with the retries used up,
        the run fails without another attempt."""
        study, retries = self.loop.study, self.loop.retries_for(unit)
        assert study is not None
        study.set_attrs(start.number, {"worker": self.worker_id})
        if self.lease is not None and self.lease.stolen_from:
            why = f"worker {self.lease.stolen_from} stopped sending heartbeats during this run"
            start.log.history.append({"attempt": max(0, start.first_attempt - 1), "micro_batch": start.micro_batch,
                                      "outcome": "lost", "exit_code": None, "message": why})
            study.set_attrs(start.number, {"attempts": start.log.history})
            if start.log.retries_used() > retries:
                start.over = Outcome("lost", None, None, f"{why}; retries used up ({retries})")

    def check(self, confirm: bool = False) -> None:
        if self.lease is None or self.claims is None:
            return
        if self.lease.lost.is_set() or (confirm and not self.claims.beat(self.lease)):
            raise ClaimLost(f"{self.lease.run_key}: another worker took this unit over (no heartbeat from this "
                            f"worker for over {self.stale_after_s:g} s); its run here is stopped, nothing recorded")

    def commit(self, record: Record) -> None:
        """The record into the database with the claim still held (else ClaimLost: nothing written), then into this
        host's records.jsonl mirror."""
        assert self.claims is not None and self.lease is not None
        if not self.claims.commit_record(self.lease, record):
            self.check()
            raise ClaimLost(f"{record.run_key}: the claim is no longer this worker's; nothing recorded")
        self.loop.ledger.append_missing(self.claims.records())

    def told(self, record: Record) -> None:
        assert self.claims is not None and self.lease is not None
        self.claims.mark_done(self.lease)


# ---------------------------------------------------------------------------------------------------------------------
# the spec a round runs: a round is bound to the spec its records ran with

# Fields that change no run: where the results and the study live (may differ by host), and how long to wait for a run
# and how often to retry a crash (how a run is supervised, not what it is). Every other field is a run condition.
SUPERVISION_FIELDS = {"output", "storage"}
SUPERVISION_DEFAULTS = {"time_limit_s", "retries", "baseline_retries", "worker"}
SUPERVISION_STAGE_FIELDS = {"time_limit_s"}
VERSION_SEPARATOR = ".v"  # a versioned round: <round>.v2, <round>.v3, ... (`fsearch round --new-version`)


class SpecChanged(SchedulerError):
    """The spec given for a round changes the conditions of the runs the round already keeps."""


def spec_text(spec: Any) -> str | None:
    """The spec's YAML: its file's text, else a dump of the parsed spec."""
    src = getattr(spec, "source", None)
    if src is not None and Path(src).exists():
        return Path(src).read_text()
    if hasattr(spec, "model_dump"):
        import yaml

        return yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False)
    return None


def spec_conditions(spec: Any) -> dict[str, Any]:
    """What a spec says about its runs, for comparison: the parsed spec (defaults filled in) without the supervision
    fields (SUPERVISION_*). Two specs with equal conditions run the same runs and judge them the same way."""
    if isinstance(spec, str):
        from orchestrator.spec import parse_spec_text

        spec = parse_spec_text(spec, "stored spec")
    data = spec.model_dump(mode="json", exclude=SUPERVISION_FIELDS)
    for key in SUPERVISION_DEFAULTS:
        data.get("defaults", {}).pop(key, None)
    for stage in (data.get("stages") or {}).values():
        if isinstance(stage, dict):
            for key in SUPERVISION_STAGE_FIELDS:
                stage.pop(key, None)
    return data


def spec_fields(spec: Any) -> dict[str, Any]:
    """A spec's content for comparison (spec_conditions)."""
    return spec_conditions(spec)


_ABSENT = object()  # a key one of two specs lacks


def _short(value: Any, width: int = 40) -> str:
    text = "(absent)" if value is _ABSENT else json.dumps(value, separators=(", ", ": "))
    return text if len(text) <= width else text[:width - 3] + "..."


def condition_changes(old: dict[str, Any], new: dict[str, Any], where: str = "") -> list[str]:
    """Every difference between two specs' conditions as `path: old -> new` (lists compared whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in list(old) + [k for k in new if k not in old]:
            path = f"{where}.{key}" if where else str(key)
            out += condition_changes(old.get(key, _ABSENT), new.get(key, _ABSENT), path)
        return out
    return [] if old == new else [f"{where or 'spec'}: {_short(old)} -> {_short(new)}"]


def describe_changes(changes: list[str], shown: int = 3) -> str:
    more = f" (and {len(changes) - shown} more)" if len(changes) > shown else ""
    return "; ".join(changes[:shown]) + more


def spec_change(kept_text: str, spec: Any, kept_where: str) -> list[str]:
    """How `spec` changes the conditions of the spec text a round keeps (`kept_where` names it); [] when it does not.
    A kept text that no longer parses is compared as text."""
    from orchestrator.spec import SpecError

    if kept_text == spec_text(spec):
        return []
    try:
        kept = spec_conditions(kept_text)
    except SpecError as e:
        return [f"{kept_where} no longer parses ({e}) and its text differs"]
    return condition_changes(kept, spec_conditions(spec))


def spec_changed_error(spec: Any, changes: list[str], kept_where: str, hint: str | None = None) -> SpecChanged:
    hint = hint or (f"to run the changed spec, give it a new `round:` name, or pass --new-version to run it as round "
                    f"{spec.round}{VERSION_SEPARATOR}N beside this one")
    return SpecChanged(f"spec: changes the runs of round {spec.round} ({describe_changes(changes)}); {kept_where} "
                       f"keeps the spec its runs were started with and is not replaced; {hint}")


def check_spec_copy(spec: Any, round_dir: Path) -> None:
    """SpecChanged if the round folder keeps a spec whose runs `spec` would change."""
    path = RoundPaths(round_dir).spec
    if path.exists():
        changes = spec_change(path.read_text(), spec, str(path))
        if changes:
            raise spec_changed_error(spec, changes, str(path))


def save_spec_copy(spec: Any, round_dir: Path, text: str | None = None) -> None:
    """Bind the round folder to the spec: write its copy (`text`, default the spec's own) when the folder has none;
    a kept copy is never replaced: SpecChanged when `spec` changes its runs, else the round resumes with the copy
    kept (the edits were comments, layout or supervision fields)."""
    check_spec_copy(spec, round_dir)
    path = RoundPaths(round_dir).spec
    text = spec_text(spec) if text is None else text
    if text is not None and not path.exists():
        round_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)


def with_round_name(text: str, name: str) -> str:
    """Spec text with its top-level `round:` set to `name` (comments and layout kept where the line is simple)."""
    import re

    import yaml

    from orchestrator.spec import SpecError, parse_spec_text

    rx = re.compile(r"^round:[ \t]*(?:\"[^\"\n]*\"|'[^'\n]*'|[^\s#'\"][^\n#]*?)?[ \t]*(#[^\n]*)?$", re.MULTILINE)
    if len(rx.findall(text)) == 1:
        out = rx.sub(lambda m: f"round: {name}" + (f"  {m.group(1)}" if m.group(1) else ""), text)
        try:
            if parse_spec_text(out).round == name:
                return out
        except SpecError:
            pass
    data = parse_spec_text(text).model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump({**data, "round": name}, sort_keys=False)


def versioned_round(spec: Any, stored_text: Any = None) -> Any:
    """The round `spec` runs as under `fsearch round --new-version`: its own round when that round keeps no spec or
    one with the same runs; else the first <round>.vN (N >= 2) that is new or keeps the same runs. A new version's
    folder gets the spec (with the new `round:`) before anything runs; the returned spec reads from that copy.
    `stored_text(name)`: the spec a shared storage keeps for a round name (None where it keeps none)."""
    from orchestrator.spec import load_spec, parse_spec_text

    def conflicts(candidate: Any, where: Path) -> list[str]:
        path = RoundPaths(where).spec
        changes = spec_change(path.read_text(), candidate, str(path)) if path.exists() else []
        stored = stored_text(candidate.round) if stored_text is not None else None
        if not changes and stored is not None:
            changes = spec_change(stored, candidate, f"the study of round {candidate.round}")
        return changes

    if not conflicts(spec, Path(spec.round_dir)):
        return spec
    base, text = spec.round, spec_text(spec)
    assert text is not None
    for n in range(2, 1000):
        name = f"{base}{VERSION_SEPARATOR}{n}"
        vtext = with_round_name(text, name)
        candidate = parse_spec_text(vtext, f"{spec.source or 'spec'} (as round {name})")
        round_dir = Path(candidate.round_dir)
        if conflicts(candidate, round_dir):
            continue
        path = RoundPaths(round_dir).spec
        if not path.exists():
            round_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, vtext)
            return load_spec(path)
        candidate._source = path  # resuming this version: its folder's copy stays the round's spec text
        return candidate
    raise SchedulerError(f"--new-version: rounds {base}{VERSION_SEPARATOR}2 to {base}{VERSION_SEPARATOR}999 all keep "
                         f"other specs; give the spec a new `round:` name")


def spec_labels(spec: Any) -> tuple[list[str], list[str]]:
    """Task labels and every candidate name of the spec (for the study's categorical choices)."""
    names = {c.name for label in spec.tasks for c in spec.candidates(label)}
    return list(spec.tasks), sorted(names)
