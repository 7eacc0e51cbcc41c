"""A round's status: the table per task and stage, and `fsearch status ROUND` reading it from another shell.

- `status_rows(...)`: per task and stage: done/planned, running, pruned, failed; the current run's step and loss
  (from its progress.json); estimated time left for the planned runs (seconds per step measured on this round's
  records, else on the current run). `format_table(rows)` prints them; `round_summary_line(rows)` sums them up.
- `round_status(round_dir)` (`fsearch status`): the table from another shell, read-only (no lock, no writes); for a
  PostgreSQL round, from the database's records, with the workers' claims (unit, heartbeat age, live or stale).

The live display and the end-of-round summary that show these rows while a round runs are in progress.py.
Torch-free.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from orchestrator.records import Record
from orchestrator.spec import STAGE_ORDER


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclass
class Active:
    """The run in progress as the status table shows it."""

    task: str
    stage: str
    candidate: str
    seed: int
    attempt: int
    progress: dict[str, Any]
    started: float | None = None


@dataclass
class StatusRow:
    task: str
    stage: str
    state: str  # waiting | running | complete | failed | skipped (the planner's), or "" without a plan
    done: int
    total: int | None
    running: int
    pruned: int
    failed: int
    current: str
    eta_s: float | None


def seconds_per_step(records: Iterable[Record], task: str | None = None) -> float | None:
    rates = [r.wall_s / r.steps for r in records if r.steps > 0 and r.wall_s > 0 and (task is None or r.task == task)]
    return statistics.median(rates) if rates else None


def _current_text(active: Active) -> str:
    p = active.progress or {}
    text = f"{active.candidate} s{active.seed}"
    if active.attempt:
        text += f" (attempt {active.attempt})"
    if p.get("step") is not None and p.get("steps"):
        text += f" step {p['step']}/{p['steps']}"
    if p.get("loss") is not None:
        text += f" loss {p['loss']:.4f}"
    return text


def _eta(records: list[Record], task: str, left_runs: int, stage_steps: int | None,
         actives: list[Active]) -> float | None:
    """Seconds left for a stage: runs not started x steps x seconds per step (this task's records, else the round's,
    else the current run's pace) + what the current runs say is left (the longest, when workers run several)."""
    rate = seconds_per_step(records, task) or seconds_per_step(records)
    for a in actives:
        p = a.progress or {}
        if rate is None and p.get("step") and a.started:
            rate = max(0.0, time.time() - a.started) / p["step"]
    lefts = []
    for a in actives:
        p = a.progress or {}
        step, steps = p.get("step"), p.get("steps")
        left = p.get("eta_s")
        if left is None and step is not None and steps and rate is not None:
            left = (steps - step) * rate
        if left is not None:
            lefts.append(left)
    active_left = max(lefts) if lefts else None
    if left_runs <= 0:
        return active_left
    if rate is None or stage_steps is None:
        return None
    return left_runs * stage_steps * rate + (active_left or 0.0)


def status_rows(records: list[Record], plan: Any = None, active: Active | list[Active] | None = None,
                stage_steps: dict[str, int] | None = None) -> list[StatusRow]:
    """One row per task and stage: from the planner's stage table when there is a plan, else from the records.
    `active`: the run in progress, or the runs of several workers."""
    stage_steps = stage_steps or {}
    actives_by: dict[tuple[str, str], list[Active]] = {}
    for a in [active] if isinstance(active, Active) else list(active or []):
        actives_by.setdefault((a.task, a.stage), []).append(a)
    recs_by: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        recs_by.setdefault((r.task, r.stage), []).append(r)
    rows = []
    if plan is not None:
        entries = [(sp.task, sp.stage, sp.state, sp.total, sp.done, sp.failed, sp.pruned) for sp in plan.stages]
    else:
        entries = []
        order = list(dict.fromkeys(r.task for r in records))
        for (task, stage), rs in sorted(recs_by.items(), key=lambda kv: (order.index(kv[0][0]), stage_rank(kv[0][1]))):
            entries.append((task, stage, "", None, len(rs), sum(r.status != "ok" for r in rs), 0))
        for task, stage in actives_by:
            if (task, stage) not in recs_by:
                entries.append((task, stage, "running", None, 0, 0, 0))
    for task, stage, state, total, done, failed, pruned in entries:
        rs = recs_by.get((task, stage), [])
        acts = actives_by.get((task, stage), [])
        pruned = max(pruned, sum(r.decision in ("prune", "diverged") for r in rs))
        left = (total - done - len(acts)) if total is not None else 0
        steps = stage_steps.get(stage) or (rs[0].budget_steps if rs else None)
        eta = _eta(records, task, left, steps, acts) if (left > 0 or acts) else None
        rows.append(StatusRow(task, stage, state, done, total, len(acts), pruned, failed,
                              "; ".join(_current_text(a) for a in acts), eta))
    return rows


def stage_rank(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


HEADERS = ("task", "stage", "state", "done", "running", "pruned", "failed", "current run", "eta")
FINISHED_STATES = ("complete", "skipped", "failed")


def round_eta(rows: list[StatusRow]) -> float | None:
    """Seconds left for the whole round as far as it is planned: the rows' estimates added up (runs go one after
    another on one worker); None while a row with work left has no estimate yet."""
    left = [r for r in rows if r.running or (r.total is not None and r.done < r.total)]
    if any(r.eta_s is None for r in left):
        return None
    return sum(r.eta_s for r in left if r.eta_s is not None)


def round_finished(rows: list[StatusRow]) -> bool:
    """Every stage of the plan has ended (complete, skipped or failed) and nothing runs."""
    return bool(rows) and all(r.state in FINISHED_STATES and not r.running for r in rows)


def round_summary_line(rows: list[StatusRow]) -> str:
    """`12/27 runs done, about 3m20s left` (the planned runs; later stages are added as they are planned)."""
    done = sum(r.done for r in rows)
    total = sum(r.total for r in rows if r.total is not None)
    eta = round_eta(rows)
    text = f"{done}/{total} planned runs done" if total else f"{done} runs done"
    if round_finished(rows):
        return text + ", round finished"
    return text + (f", about {fmt_duration(eta)} left" if eta is not None else ", time left not known yet")


def row_cells(r: StatusRow) -> list[str]:
    done = f"{r.done}/{r.total}" if r.total is not None else (str(r.done) if r.done or r.state != "waiting" else "-")
    return [r.task, r.stage, r.state or "-", done, str(r.running), str(r.pruned), str(r.failed), r.current or "-",
            fmt_duration(r.eta_s) if r.eta_s is not None else "-"]


def format_table(rows: list[StatusRow]) -> str:
    """Plain-text table (no terminal needed)."""
    cells = [list(HEADERS)] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(HEADERS))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stage_steps_of(spec: Any) -> dict[str, int]:
    try:
        return {name: st.steps for name, st in spec.stage_list()}
    except Exception:  # noqa: BLE001
        return {}


def plan_task_state(plan: Any) -> dict[str, str]:
    """{task: one-line state} from a Plan: its current stage, "done (<why>)", or "failed: <reason>"."""
    out = {}
    for task, t in (getattr(plan, "tasks", None) or {}).items():
        text = str(t)
        if getattr(t, "status", None) == "done" and getattr(t, "reason", ""):
            text += f" ({t.reason})"
        out[task] = text
    return out


# ---------------------------------------------------------------------------------------------------------------------
# `fsearch status ROUND`: the same table from another shell (read-only: no lock, no writes)

@dataclass
class RoundStatus:
    header: str
    rows: list[StatusRow]
    notes: list[str]


def scheduler_pid(round_dir: Any) -> int | None:
    """The pid of the scheduler running this round, if its pid file names a live process."""
    import os

    try:
        pid = int((Path(round_dir) / "scheduler.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def probed_batch_sizes(round_dir: Any) -> dict[str, int]:
    """The batch sizes a round's probes picked (<round>/probe/<task>.json)."""
    import json

    out = {}
    for p in sorted((Path(round_dir) / "probe").glob("*.json")):
        try:
            out[p.stem] = int(json.loads(p.read_text())["micro_batch"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return out


def _active_of(run_key: str, trial: Any) -> Active | None:
    """The status table's view of a run in progress: its key's parts, and from its RUNNING trial (if any) the attempt,
    start time and the run's progress.json (readable when the run's folder is on this host)."""
    import json

    from orchestrator.runkey import parse_run_key

    try:
        parts = parse_run_key(str(run_key))
    except ValueError:
        return None
    attrs = trial.user_attrs if trial is not None else {}
    prog = {}
    if attrs.get("run_dir"):
        try:
            prog = json.loads((Path(attrs["run_dir"]) / "progress.json").read_text())
        except (OSError, ValueError):
            prog = {}
    started = trial.started.timestamp() if trial is not None and trial.started else None
    return Active(parts["task"], parts["stage"], parts["candidate"], parts["seed"], int(attrs.get("attempt") or 0),
                  prog, started)


def worker_lines(now: float, claims: list[Any]) -> tuple[list[str], list[Any]]:
    """What each worker of a shared round holds, from its claim rows: (one line per running claim, the live claims).
    A stale claim (no heartbeat within its timeout, or its process on this host is gone) is taken
    over by the next worker that looks for work."""
    from orchestrator.claims import PROBE_PREFIX, RUNNING

    lines, live = [], []
    for c in claims:
        if c.state != RUNNING:
            continue
        what = (f"batch probe of {c.run_key[len(PROBE_PREFIX):]}" if c.run_key.startswith(PROBE_PREFIX)
                else c.run_key)
        age = f"heartbeat {fmt_duration(now - c.heartbeat_at)} ago"
        if c.live(now):
            live.append(c)
            lines.append(f"  {c.worker}: {what}, {age}, live")
        else:
            lines.append(f"  {c.worker}: {what}, {age}, stale (timeout {c.stale_after_s:g} s): the next "
                         f"worker takes it over")
    return lines, live


@dataclass
class _StudyView:
    """What `fsearch status` could read of a round's study: its snapshot, and for a shared (PostgreSQL) round the
    workers' claims and the database's records."""

    snapshot: Any = None
    shared: bool = False
    claims: tuple[float, list[Any]] | None = None  # (the database's time now, the claim rows)
    records: list[Record] | None = None  # the round's truth where shared; this host's records.jsonl may lag behind

    def running(self) -> dict[str, Any]:
        """The study's RUNNING trials by run key."""
        return {t.user_attrs.get("run_key"): t for t in self.snapshot.running} if self.snapshot is not None else {}


def _read_spec_copy(round_dir: Path, notes: list[str]) -> Any:
    """The round's spec copy, or None (with a note where it exists but cannot be read)."""
    if not (round_dir / "spec.yaml").exists():
        return None
    try:
        from orchestrator.spec import load_spec

        return load_spec(round_dir / "spec.yaml")
    except Exception as e:  # noqa: BLE001 - the table still works from the records
        notes.append(f"note: the round's spec copy cannot be read ({' '.join(str(e).split())[:200]})")
        return None


def _read_study(round_dir: Path, spec: Any, name: str, storage_url: str | None, notes: list[str]) -> _StudyView:
    """The round's study, read-only; a study that cannot be read leaves a note (and the hint of a saved storage URL
    whose password was removed)."""
    view = _StudyView()
    try:
        from orchestrator.study import is_shared_storage, read_snapshot, round_storage_url, saved_storage

        url = round_storage_url(round_dir, spec, storage_url)
        view.shared = is_shared_storage(url)
        view.snapshot = read_snapshot(url, name)
        if view.shared:
            from orchestrator.claims import read_claims, read_records

            view.claims = read_claims(url, name)
            view.records = read_records(url, name)
    except Exception as e:  # noqa: BLE001
        notes.append(f"note: the study cannot be read ({' '.join(str(e).split())[:200]})")
        try:
            saved = saved_storage(round_dir) if storage_url is None else None
        except Exception:  # noqa: BLE001 - already said: the study cannot be read
            saved = None
        if saved is not None and saved.password_removed:
            notes.append(f"note: {saved.password_hint}")
    return view


def _shared_actives(view: _StudyView, notes: list[str]) -> tuple[list[Active], list[Any]]:
    """A shared round's runs in progress: those a live claim holds (the workers' lines go to `notes`); a RUNNING trial
    without a live claim is noted as stopped. Returns (the runs in progress, the live claims)."""
    now, claims = view.claims if view.claims is not None else (0.0, [])
    lines, live = worker_lines(now, claims)
    notes.append("workers (claims in the database):" if lines else "workers: none holds a unit now")
    notes.extend(lines)
    running = view.running()
    actives: list[Active] = []
    for c in live:  # in claim order; a batch probe's key is not a run's (parse fails: no table row)
        a = _active_of(c.run_key, running.get(c.run_key))
        if a is not None:
            actives.append(a)
    live_keys = {c.run_key for c in live}
    for key, t in running.items():
        if key not in live_keys:
            notes.append(f"note: trial {t.number} ({key}) is RUNNING without a live claim: its worker stopped; "
                         f"the next worker of the round resumes it")
    return actives, live


def _local_actives(view: _StudyView, pid: int | None, notes: list[str]) -> list[Active]:
    """A local round's runs in progress: its RUNNING trials while its scheduler runs (else they were interrupted)."""
    actives: list[Active] = []
    for key, t in view.running().items():
        if pid is None:
            notes.append(f"note: trial {t.number} ({key}) is RUNNING but no scheduler is: "
                         f"interrupted; run the round's command again to resume it")
            continue
        a = _active_of(key, t)
        if a is not None:
            actives.append(a)
    return actives


def _planned_rows(round_dir: Path, spec: Any, records: list[Record], actives: list[Active],
                  notes: list[str]) -> list[StatusRow]:
    """The table's rows: from the planner's stage table where the spec copy plans (each task's state goes to
    `notes`), else from the records."""
    pl = None
    if spec is not None:
        try:
            from orchestrator.planner import plan

            pl = plan(spec, records, batch_sizes=probed_batch_sizes(round_dir))
            for task, st in plan_task_state(pl).items():
                notes.append(f"{task}: {st}")
        except Exception as e:  # noqa: BLE001
            notes.append(f"note: cannot plan from the spec copy ({' '.join(str(e).split())[:200]})")
    return status_rows(records, pl, actives, stage_steps_of(spec) if spec is not None else None)


def round_status(round_dir: Any, storage_url: str | None = None) -> RoundStatus:
    """The status of a round folder, read-only. SQLite: records.jsonl, the study's RUNNING trials and scheduler.pid.
    PostgreSQL (the URL from `storage_url`, <round>/storage.json or the spec copy): the database's records and the
    workers' claims; a RUNNING trial is in progress while a live claim holds its unit."""
    from orchestrator.records import Ledger

    round_dir = Path(round_dir)
    notes: list[str] = []
    spec = _read_spec_copy(round_dir, notes)
    records = Ledger(round_dir / "records.jsonl").read()
    name = spec.round if spec is not None else round_dir.name
    pid = scheduler_pid(round_dir)
    view = _read_study(round_dir, spec, name, storage_url, notes)
    if view.records is not None:
        records = view.records
    if view.shared:
        actives, live = _shared_actives(view, notes)
    else:
        actives, live = _local_actives(view, pid, notes), []
    counts = view.snapshot.counts if view.snapshot is not None else {}
    rows = _planned_rows(round_dir, spec, records, actives, notes)
    if view.shared:
        state = f"{len({c.worker for c in live})} worker(s) running units" + (f", coordinator pid {pid}" if pid else "")
    else:
        state = f"scheduler running (pid {pid})" if pid else "no scheduler running"
    trials = ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items())) or "no trials"
    header = f"round {name} ({round_dir}): {state}; {len(records)} runs recorded; study: {trials}"
    return RoundStatus(header, rows, notes)
