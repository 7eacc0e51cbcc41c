"""The live display in an 80-column terminal, the whole round's time left, and what a round's start says (new,
resumed, already finished)."""
from __future__ import annotations

import io
from dataclasses import dataclass
from types import SimpleNamespace

from rich.console import Console

from orchestrator.progress import (PlainDisplay, StatusRow, rich_table, round_eta, round_finished, round_summary_line,
                                   start_line)


def rows_mid_round() -> list[StatusRow]:
    return [StatusRow("sudoku4", "quick", "complete", 6, 6, 0, 2, 0, "", None),
            StatusRow("sudoku4", "med", "running", 1, 4, 1, 0, 0,
                      "scalar_l2_trainable s0 (attempt 1) step 120/200 loss 0.4321", 95.0),
            StatusRow("sudoku4", "seedcheck", "waiting", 0, None, 0, 0, 0, "", None),
            StatusRow("constr", "seedcheck", "running", 2, 9, 0, 0, 1, "", 300.0)]


def render(renderable, width: int = 80) -> str:
    console = Console(width=width, record=True, force_terminal=False, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_live_table_fits_80_columns_without_cutting_stage_or_state():
    text = render(rich_table(rows_mid_round(), title="round demo"))
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert "…" not in text
    for word in ("complete", "seedcheck", "constr", "running", "waiting", "1m35s"):
        assert word in text
    assert "now: sudoku4 med: scalar_l2_trainable s0 (attempt 1) step 120/200 loss 0.4321" in text
    assert "13 planned runs done" not in text  # planned totals only: 6 + 4 + 9
    assert "9/19 planned runs done, about 6m35s left" in text


def test_long_task_label_is_folded_not_cut():
    rows = [StatusRow("a_rather_long_task_label_for_a_port", "seedcheck", "complete", 12, 12, 0, 1, 0, "", None)]
    text = render(rich_table(rows))
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    assert "…" not in text and "seedcheck" in text and "complete" in text


def test_round_eta_adds_the_stages_left_and_waits_for_unknown_ones():
    rows = rows_mid_round()
    assert round_eta(rows) == 395.0
    rows[1].eta_s = None  # a stage with runs left and no estimate yet: the round's time left is not known
    assert round_eta(rows) is None
    assert round_summary_line(rows).endswith("time left not known yet")


def test_round_finished_only_when_every_stage_ended():
    done = [StatusRow("t", "quick", "complete", 2, 2, 0, 0, 0, "", None),
            StatusRow("t", "med", "skipped", 0, 0, 0, 0, 0, "", None),
            StatusRow("u", "quick", "failed", 1, 2, 0, 0, 1, "", None)]
    assert round_finished(done) and round_summary_line(done) == "3/4 planned runs done, round finished"
    assert not round_finished(rows_mid_round())
    assert not round_finished([])


@dataclass
class StageProgress:
    task: str
    stage: str
    state: str
    total: int
    done: int
    failed: int = 0
    pruned: int = 0


def fake_sched(records: int, states: list[str]):
    stages = [StageProgress("t", s, st, 2, 2 if st == "complete" else 0) for s, st in zip(("quick", "med"), states)]
    recs = [SimpleNamespace(task="t", stage="quick", wall_s=1.0, steps=10, status="ok", decision="promote",
                            budget_steps=10) for _ in range(records)]
    spec = SimpleNamespace(round="demo", stage_list=lambda: [("quick", SimpleNamespace(steps=10))])
    return SimpleNamespace(records=recs, spec=spec, round_dir="results/demo", active=None,
                           plan=lambda: SimpleNamespace(stages=stages))


def test_start_line_new_resumed_finished():
    assert start_line(fake_sched(0, ["waiting", "waiting"])) == "round demo: results/demo"
    assert start_line(fake_sched(2, ["complete", "waiting"])) == "round demo: results/demo (resuming: 2 runs recorded)"
    assert start_line(fake_sched(4, ["complete", "complete"])) == (
        "round demo: results/demo: round already finished: 4 runs recorded, nothing to run")
    out = io.StringIO()
    PlainDisplay(out).round_started(fake_sched(4, ["complete", "complete"]))
    assert "round already finished: 4 runs recorded" in out.getvalue() and "resuming" not in out.getvalue()
