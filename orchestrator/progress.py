"""What a researcher sees of a round: a status table per task and stage, run events, and the end-of-round summary.

- `status_rows(...)`: per task and stage: done/planned, running, pruned, failed; the current run's step and loss
  (from its progress.json); estimated time left for the planned runs (seconds per step measured on this round's
  records, else on the current run).
- `RichDisplay` (a terminal: a live table) and `PlainDisplay` (no tty, e.g. CI: one line per event, a progress line
  every PLAIN_PROGRESS_EVERY_S) implement the scheduler's display hooks.
- `format_summary(records, ...)`: per task, the baseline value and each candidate's delta and decision per stage.
- `round_status(round_dir)` (`fsearch status`): the table from another shell; for a PostgreSQL round, from the
  database's records, with the workers' claims (unit, heartbeat age, live or stale).

Torch-free.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable, TextIO

from orchestrator.records import Record
from orchestrator.spec import STAGE_ORDER

PLAIN_PROGRESS_EVERY_S = 30.0
RICH_REFRESH_PER_S = 4


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def fmt_value(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


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
        for (task, stage), rs in sorted(recs_by.items(), key=lambda kv: (order.index(kv[0][0]), _stage_rank(kv[0][1]))):
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


def _stage_rank(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


HEADERS = ("task", "stage", "state", "done", "running", "pruned", "failed", "current run", "eta")
# the live table's columns: short enough that a row fits 80 columns; the runs in progress go below the table
LIVE_HEADERS = ("task", "stage", "state", "done", "run", "pruned", "failed", "eta")
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


def rich_table(rows: list[StatusRow], title: str | None = None):
    """The live table: one line per task and stage in 80 columns (stage and state never cut; a long task label is
    folded), then one line per run in progress and the whole round's progress and time left."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    lines = [f"now: {r.task} {r.stage}: {r.current}" for r in rows if r.current]
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1),
                  pad_edge=False, collapse_padding=True)
    for h in LIVE_HEADERS:
        right = h in ("done", "run", "pruned", "failed", "eta")
        table.add_column(h, justify="right" if right else "left", no_wrap=h != "task",
                         overflow="fold" if h == "task" else "ellipsis")
    for r in rows:
        cells = row_cells(r)
        table.add_row(*(cells[:7] + cells[8:]))
    return Group(table, Text("\n".join(lines + [round_summary_line(rows)]), overflow="fold"))


# ---------------------------------------------------------------------------------------------------------------------
# end-of-round summary

CONDITION_FIELDS = ("budget_steps", "eval_every", "n_val", "data_seed", "batch_size")  # what a stage's runs share


def condition_groups(recs: list[Record]) -> list[list[Record]]:
    """A stage's records split by their conditions (CONDITION_FIELDS), in order of first appearance: more than one
    group means the round's spec was changed between runs, and the groups must never be pooled."""
    groups: dict[tuple, list[Record]] = {}
    for r in recs:
        groups.setdefault(tuple(getattr(r, f) for f in CONDITION_FIELDS), []).append(r)
    return list(groups.values())


def _conditions_label(group: list[Record], groups: list[list[Record]]) -> str:
    """`30 steps` for a stage of one condition; the fields that tell the groups apart where there are several."""
    head = group[0]
    if len(groups) == 1:
        return f"{head.budget_steps} steps"
    differ = [f for f in CONDITION_FIELDS if len({getattr(g[0], f) for g in groups}) > 1]
    return ", ".join(f"{head.budget_steps} steps" if f == "budget_steps" else f"{f} {getattr(head, f)}"
                     for f in differ)


def mixed_conditions(records: list[Record]) -> list[str]:
    """One line per (task, stage) whose records hold runs of different conditions (a spec changed mid-round)."""
    out = []
    by_stage: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        by_stage.setdefault((r.task, r.stage), []).append(r)
    for (task, stage), recs in by_stage.items():
        groups = condition_groups(recs)
        if len(groups) > 1:
            parts = ", ".join(f"{_conditions_label(g, groups)}: {len(g)} runs" for g in groups)
            out.append(f"{task} {stage}: records of {len(groups)} different conditions ({parts}); the spec was "
                       f"changed between runs; they are shown apart, never pooled")
    return out


def format_summary(records: list[Record], plan: Any = None, task_order: list[str] | None = None) -> str:
    """Per task: the baseline's value and every candidate's delta and decision, stage by stage (the planner's
    stage decision where there is one, else the records' own decisions). Runs of different conditions in one stage
    (a spec changed between runs) are never pooled: each condition gets its own block, under a WARNING line."""
    task_state = plan_task_state(plan) if plan is not None else {}
    stage_decision = {(d.task, d.stage, d.candidate): d for d in (getattr(plan, "decisions", None) or [])}
    by_task: dict[str, list[Record]] = {}
    for r in records:
        by_task.setdefault(r.task, []).append(r)
    order = [t for t in (task_order or []) if t in by_task] + [t for t in by_task if t not in (task_order or [])]
    out = [f"WARNING: {line}" for line in mixed_conditions(records)]
    for task in order:
        recs = by_task[task]
        head = recs[0]
        threshold = next((r.threshold for r in recs if r.threshold is not None), None)
        state = task_state.get(task)
        out.append(f"[{task}] {head.task_kind}, metric {head.metric}"
                   + (f", threshold {threshold:+.4f}" if threshold is not None else "")
                   + (f": {state}" if state else ""))
        for stage in sorted({r.stage for r in recs}, key=_stage_rank):
            groups = condition_groups([r for r in recs if r.stage == stage])
            for srecs in groups:
                # the planner decides over the current spec's runs only: with several conditions, each block shows
                # its records' own decisions
                decisions = stage_decision if len(groups) == 1 else {}
                out += _stage_block(task, stage, srecs, _conditions_label(srecs, groups), decisions)
    return "\n".join(out) if out else "no records"


def _stage_block(task: str, stage: str, srecs: list[Record], label: str, stage_decision: dict) -> list[str]:
    out = []
    base = [r for r in srecs if r.mode == "baseline"]
    bvals = [r.value for r in base if r.value is not None]
    if bvals:
        btxt = f"baseline {fmt_value(statistics.mean(bvals))}" + (f" (mean of {len(bvals)} seeds)"
                                                                  if len(bvals) > 1 else "")
    else:
        btxt = "baseline " + ("; ".join(f"{r.status} ({r.error_kind}): {r.error_message}" for r in base)
                              or "missing")
    out.append(f"  {stage} ({label}): {btxt}")
    cands: dict[str, list[Record]] = {}
    for r in srecs:
        if r.mode != "baseline":
            cands.setdefault(r.candidate, []).append(r)
    width = max((len(c) for c in cands), default=0)
    for cand, crs in sorted(cands.items(), key=lambda kv: -(_mean_delta(kv[1]) or -1e9)):
        d = stage_decision.get((task, stage, cand))
        md = d.mean_delta if d is not None else _mean_delta(crs)
        vals = [r.value for r in crs if r.value is not None]
        n = len(crs)
        decision = d.decision if d is not None else "/".join(sorted({r.decision for r in crs}))
        txt = (f"    {cand.ljust(width)}  value {fmt_value(statistics.mean(vals) if vals else None)}  "
               f"delta {fmt_value(md, signed=True)}" + (f" (mean of {n} seeds)" if n > 1 else "")
               + f"  {decision}")
        failed = [r for r in crs if r.status != "ok"]
        if failed:
            txt += "  (" + "; ".join(f"s{r.seed} {r.status}: {r.error_kind or ''}".strip() for r in failed) + ")"
        out.append(txt)
    return out


def _mean_delta(recs: list[Record]) -> float | None:
    ds = [r.delta for r in recs if r.delta is not None]
    return statistics.mean(ds) if ds else None


# ---------------------------------------------------------------------------------------------------------------------
# displays (the scheduler's hooks)

def _active_from(sched: Any) -> Active | None:
    a = getattr(sched, "active", None)
    if a is None:
        return None
    k = a.unit.key
    return Active(k.task, k.stage, k.candidate, k.seed, a.attempt, dict(a.progress or {}), a.started)


def stage_steps_of(spec: Any) -> dict[str, int]:
    try:
        return {name: st.steps for name, st in spec.stage_list()}
    except Exception:  # noqa: BLE001
        return {}


def _sched_plan(sched: Any) -> Any:
    try:
        return sched.plan()
    except Exception:  # noqa: BLE001 - the display never stops a round
        return None


def _sched_rows(sched: Any, plan: Any = None) -> list[StatusRow]:
    plan = plan if plan is not None else _sched_plan(sched)
    return status_rows(sched.records, plan, _active_from(sched), stage_steps_of(sched.spec))


def plan_task_state(plan: Any) -> dict[str, str]:
    """{task: one-line state} from a Plan: its current stage, "done (<why>)", or "failed: <reason>"."""
    out = {}
    for task, t in (getattr(plan, "tasks", None) or {}).items():
        text = str(t)
        if getattr(t, "status", None) == "done" and getattr(t, "reason", ""):
            text += f" ({t.reason})"
        out[task] = text
    return out


def start_line(sched: Any) -> str:
    """What a round's start says: a new round, a resumed one (N runs recorded), or one with nothing left to run."""
    n = len(sched.records)
    head = f"round {sched.spec.round}: {sched.round_dir}"
    if not n:
        return head
    if round_finished(_sched_rows(sched)):
        return f"{head}: round already finished: {n} runs recorded, nothing to run"
    return f"{head} (resuming: {n} runs recorded)"


class PlainDisplay:
    """One line per event; a progress line at most every PLAIN_PROGRESS_EVERY_S. For logs and CI (no tty)."""

    def __init__(self, stream: TextIO | None = None, progress_every_s: float = PLAIN_PROGRESS_EVERY_S):
        self.stream = stream or sys.stdout
        self.every = progress_every_s
        self._last = 0.0

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def round_started(self, sched: Any) -> None:
        self._print(start_line(sched))
        self._print(format_table(_sched_rows(sched)))

    def run_started(self, sched: Any, active: Any) -> None:
        k = active.unit.key
        extra = f", attempt {active.attempt}" if active.attempt else ""
        self._print(f"[{k.task} {k.stage}] {k.candidate} s{k.seed}: started (micro-batch {active.micro_batch}{extra})")
        self._last = time.time()

    def run_progress(self, sched: Any, active: Any) -> None:
        if time.time() - self._last < self.every or not active.progress:
            return
        self._last = time.time()
        p = active.progress
        k = active.unit.key
        loss = f" loss {p['loss']:.4f}" if p.get("loss") is not None else ""
        self._print(f"[{k.task} {k.stage}] {k.candidate} s{k.seed}: step {p.get('step')}/{p.get('steps')}{loss}"
                    f" eta {fmt_duration(p.get('eta_s'))}")

    def run_finished(self, sched: Any, record: Record) -> None:
        self._print(f"[{record.task} {record.stage}] {record_line(record)}")
        rows = _sched_rows(sched)
        if any((r.task, r.stage, r.state) == (record.task, record.stage, "complete") for r in rows):
            self._print(format_table(rows))  # a stage just completed: the whole table, once

    def message(self, text: str) -> None:
        self._print(text)

    def round_finished(self, sched: Any) -> None:
        pass


def record_line(r: Record) -> str:
    txt = f"{r.candidate} s{r.seed}: {r.status}"
    if r.value is not None:
        txt += f" {r.metric}={r.value:.4f}"
    if r.delta is not None:
        txt += f" delta={r.delta:+.4f}"
    txt += f" -> {r.decision}"
    if r.micro_batch != r.batch_size:
        txt += f" (micro-batch {r.micro_batch} x{r.grad_accum})"
    if r.error_kind and r.status != "ok":
        txt += f" [{r.error_kind}: {r.error_message or ''}]"
    return txt + f" ({fmt_duration(r.wall_s)})"


class RichDisplay(PlainDisplay):
    """A live table for a terminal; events are printed above it."""

    def __init__(self, console: Any = None):
        from rich.console import Console
        from rich.live import Live

        super().__init__()
        self.console = console or Console()
        self.live = Live(console=self.console, refresh_per_second=RICH_REFRESH_PER_S, transient=False)
        self._sched = None
        self._plan = None  # re-planned when a run starts or ends, not at every progress refresh
        self._last_table = 0.0

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def _refresh(self, force: bool = False) -> None:
        if self._sched is None or (not force and time.time() - self._last_table < 1.0 / RICH_REFRESH_PER_S):
            return
        self._last_table = time.time()
        if force or self._plan is None:
            self._plan = _sched_plan(self._sched)
        rows = _sched_rows(self._sched, self._plan)
        self.live.update(rich_table(rows, title=f"round {self._sched.spec.round}"), refresh=True)

    def round_started(self, sched: Any) -> None:
        self._sched = sched
        self._print(start_line(sched))
        self.live.start()
        self._refresh(force=True)

    def run_started(self, sched: Any, active: Any) -> None:
        self._refresh(force=True)

    def run_progress(self, sched: Any, active: Any) -> None:
        self._refresh()

    def run_finished(self, sched: Any, record: Record) -> None:
        self._print(f"[{record.task} {record.stage}] {record_line(record)}")
        self._refresh(force=True)

    def round_finished(self, sched: Any) -> None:
        self._refresh(force=True)
        self.live.stop()

    def close(self) -> None:
        if self.live.is_started:
            self.live.stop()


def make_display(stream: TextIO | None = None) -> PlainDisplay:
    stream = stream or sys.stdout
    if stream.isatty():
        return RichDisplay()
    return PlainDisplay(stream)


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
    from pathlib import Path

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
    from pathlib import Path

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
    from pathlib import Path

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


def round_status(round_dir: Any, storage_url: str | None = None) -> RoundStatus:
    """The status of a round folder, read-only. SQLite: records.jsonl, the study's RUNNING trials and scheduler.pid.
    PostgreSQL (the URL from `storage_url`, <round>/storage.json or the spec copy): the database's records and the
    workers' claims; a RUNNING trial is in progress while a live claim holds its unit."""
    from pathlib import Path

    from orchestrator.records import Ledger

    round_dir = Path(round_dir)
    notes: list[str] = []
    spec = None
    if (round_dir / "spec.yaml").exists():
        try:
            from orchestrator.spec import load_spec

            spec = load_spec(round_dir / "spec.yaml")
        except Exception as e:  # noqa: BLE001 - the table still works from the records
            notes.append(f"note: the round's spec copy cannot be read ({' '.join(str(e).split())[:200]})")
    records = Ledger(round_dir / "records.jsonl").read()
    name = spec.round if spec is not None else round_dir.name
    pid = scheduler_pid(round_dir)

    snap, shared, claims = None, False, None
    try:
        from orchestrator.study import is_shared_storage, read_snapshot, round_storage_url, saved_storage

        url = round_storage_url(round_dir, spec, storage_url)
        shared = is_shared_storage(url)
        snap = read_snapshot(url, name)
        if shared:
            from orchestrator.claims import read_claims, read_records

            claims = read_claims(url, name)
            stored = read_records(url, name)
            if stored is not None:
                records = stored  # the round's truth; this host's records.jsonl may lag behind other hosts' workers
    except Exception as e:  # noqa: BLE001
        notes.append(f"note: the study cannot be read ({' '.join(str(e).split())[:200]})")
        try:
            saved = saved_storage(round_dir) if storage_url is None else None
        except Exception:  # noqa: BLE001 - already said: the study cannot be read
            saved = None
        if saved is not None and saved.password_removed:
            notes.append(f"note: {saved.password_hint}")
    running = {t.user_attrs.get("run_key"): t for t in snap.running} if snap is not None else {}
    counts = snap.counts if snap is not None else {}

    actives: list[Active] = []
    if shared:
        now, rows = claims if claims is not None else (0.0, [])
        lines, live = worker_lines(now, rows)
        notes.append("workers (claims in the database):" if lines else "workers: none holds a unit now")
        notes.extend(lines)
        for c in live:  # in claim order; a batch probe's key is not a run's (parse fails: no table row)
            a = _active_of(c.run_key, running.get(c.run_key))
            if a is not None:
                actives.append(a)
        live_keys = {c.run_key for c in live}
        for key, t in running.items():
            if key not in live_keys:
                notes.append(f"note: trial {t.number} ({key}) is RUNNING without a live claim: its worker stopped; "
                             f"the next worker of the round resumes it")
    else:
        for key, t in running.items():
            if pid is None:
                notes.append(f"note: trial {t.number} ({key}) is RUNNING but no scheduler is: "
                             f"interrupted; run the round's command again to resume it")
                continue
            a = _active_of(key, t)
            if a is not None:
                actives.append(a)

    pl = None
    if spec is not None:
        try:
            from orchestrator.planner import plan

            pl = plan(spec, records, batch_sizes=probed_batch_sizes(round_dir))
            for task, st in plan_task_state(pl).items():
                notes.append(f"{task}: {st}")
        except Exception as e:  # noqa: BLE001
            notes.append(f"note: cannot plan from the spec copy ({' '.join(str(e).split())[:200]})")
    rows = status_rows(records, pl, actives, stage_steps_of(spec) if spec is not None else None)
    if shared:
        state = f"{len({c.worker for c in live})} worker(s) running units" + (f", coordinator pid {pid}" if pid else "")
    else:
        state = f"scheduler running (pid {pid})" if pid else "no scheduler running"
    trials = ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items())) or "no trials"
    header = f"round {name} ({round_dir}): {state}; {len(records)} runs recorded; study: {trials}"
    return RoundStatus(header, rows, notes)
