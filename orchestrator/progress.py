"""What a researcher sees of a round while it runs: the live status table, run events, and the end-of-round summary.

- `RichDisplay` (a terminal: a live table) and `PlainDisplay` (no tty, e.g. CI: one line per event, a progress line
  every PLAIN_PROGRESS_EVERY_S) implement the scheduler's display hooks.
- `format_summary(records, ...)`: per task, the baseline value and each candidate's delta and decision per stage.

The table's rows and `fsearch status` (the same table from another shell) are in status.py; the names other modules
import from here are re-exported.

Torch-free.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any, TextIO

from orchestrator.records import Record
from orchestrator.status import (FINISHED_STATES, HEADERS, Active, RoundStatus, StatusRow, fmt_duration, format_table,
                                 plan_task_state, probed_batch_sizes, round_eta, round_finished, round_status,
                                 round_summary_line, row_cells, scheduler_pid, seconds_per_step, stage_rank,
                                 stage_steps_of, status_rows, worker_lines)

__all__ = [
    # re-exported from orchestrator.status
    "FINISHED_STATES", "HEADERS", "Active", "RoundStatus", "StatusRow", "fmt_duration", "format_table",
    "plan_task_state", "probed_batch_sizes", "round_eta", "round_finished", "round_status", "round_summary_line",
    "row_cells", "scheduler_pid", "seconds_per_step", "stage_rank", "stage_steps_of", "status_rows", "worker_lines",
    # this module's
    "PLAIN_PROGRESS_EVERY_S", "RICH_REFRESH_PER_S", "LIVE_HEADERS", "CONDITION_FIELDS", "fmt_value", "rich_table",
    "condition_groups", "mixed_conditions", "format_summary", "start_line", "PlainDisplay", "RichDisplay",
    "record_line", "make_display",
]

PLAIN_PROGRESS_EVERY_S = 30.0
RICH_REFRESH_PER_S = 4
# the live table's columns: short enough that a row fits 80 columns; the runs in progress go below the table
LIVE_HEADERS = ("task", "stage", "state", "done", "run", "pruned", "failed", "eta")


def fmt_value(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


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
        for stage in sorted({r.stage for r in recs}, key=stage_rank):
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


def _sched_plan(sched: Any) -> Any:
    try:
        return sched.plan()
    except Exception:  # noqa: BLE001 - the display never stops a round
        return None


def _sched_rows(sched: Any, plan: Any = None) -> list[StatusRow]:
    plan = plan if plan is not None else _sched_plan(sched)
    return status_rows(sched.records, plan, _active_from(sched), stage_steps_of(sched.spec))


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
