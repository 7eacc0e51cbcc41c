"""A round's report, derived from its records alone, and the check that re-derives it.

`write_report(round_dir)` writes <round>/report/:
  summary.json   every number of the report with the run keys it comes from (machine-readable)    build.py
  report.md      per task: matched baselines, each stage's candidates with deltas and decisions,   markdown.py
                 the seed-check table (intervals, p-values, decision), noise, compute per stage and
                 what pruning saved; the decision rule. A comparison round (seedcheck its only
                 stage) says so instead of describing screening (summary.json "kind").
  summary.txt    the same results in the original system's text formats                          text.py
  deltas_<task>.png, curves_<task>.png                                                           plots.py
  (--rates)      in report.md: the protocol's error rates under the round's measured noise       rates.py
`check_report(round_dir)` (check.py) recomputes the summary from records.jsonl (+ spec.yaml, + each run's
metrics.jsonl for the final-eval cross-check), compares it number by number with summary.json, re-renders report.md
and summary.txt, and returns one message per mismatch or missing record (empty: the report is exactly what the
records say). Integrity checks of the records themselves are in integrity.py; reading the round folder in load.py.

The report makes no decision of its own: stage decisions, record decisions and seed-check decisions come from
orchestrator.decisions, the code the planner acts on.

Sources of every number: records.jsonl (values, deltas, wall times, decisions), spec.yaml (stage seeds/steps and the
task's candidate list: only for the cost of running every candidate through every stage), run_dir/metrics.jsonl (the
validation curves in the plots, and a cross-check that a record's value is its run's final evaluation).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.decisions import SeedCheckRule
from orchestrator.fileio import write_text_atomic
from orchestrator.paths import RoundPaths
from orchestrator.report.build import build_summary
from orchestrator.report.check import check_report
from orchestrator.report.load import ReportError, RoundData, load_round
from orchestrator.report.markdown import render_markdown
from orchestrator.report.plots import write_plots
from orchestrator.report.rates import RATES_REPLICATES, protocol_rates
from orchestrator.report.text import render_text

__all__ = ["ReportError", "RoundData", "build_summary", "check_report", "load_round", "render_markdown",
           "render_text", "summary_json", "write_report"]


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=1, allow_nan=False) + "\n"


def write_report(round_dir: Path, rule: SeedCheckRule | None = None, rates: bool = False,
                 replicates: int = RATES_REPLICATES) -> Path:
    """Write <round>/report/{report.md, summary.json, summary.txt, *.png}; returns the report.md path. `rates`: add
    the protocol's simulated error rates under the round's measured noise (`replicates` per scenario, seconds)."""
    round_dir = Path(round_dir)
    data = load_round(round_dir)
    summary = build_summary(data, rule)
    if rates:
        summary["rates"] = protocol_rates(data, replicates)
    out = RoundPaths(round_dir).report
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    write_plots(summary, data, out)
    write_text_atomic(out / "summary.json", summary_json(summary))
    write_text_atomic(out / "summary.txt", render_text(summary))
    write_text_atomic(out / "report.md", render_markdown(summary))
    return out / "report.md"
