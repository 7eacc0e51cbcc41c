"""The rounds kept under results/examples: their reports still agree with their records (as `fsearch report
--check` recomputes them today), and the README's synthetic table says what the example's summary says."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from orchestrator.report import check_report

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "results" / "examples"
ROUNDS = sorted(p for p in EXAMPLES.iterdir() if (p / "records.jsonl").is_file()) if EXAMPLES.is_dir() else []


@pytest.mark.parametrize("round_dir", ROUNDS, ids=lambda p: p.name)
def test_example_report_matches_its_records(round_dir, tmp_path, monkeypatch):
    work = tmp_path / round_dir.name
    shutil.copytree(round_dir, work)  # check_report reads only, but never risk the committed copy
    monkeypatch.chdir(tmp_path)       # the records' run_dir (results/<round>/runs/...) must not find a live round
    assert check_report(work) == []


def test_there_are_examples():
    assert {p.name for p in ROUNDS} >= {"gpu_demo_h100", "synthetic_table_h100"}


def _readme_synthetic_rows() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("**The original's synthetic table**"):]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| (\w+) \((\w+)\) \| ([0-9.]+) \| (.+) \| (.+) \|$", line)
        if m:
            rows[m.group(1)] = [m.group(3), m.group(4), m.group(5)]
    return rows


def _num(x: float, digits: int) -> str:
    s = f"{x:+.{digits}f}"
    if float(s) == 0.0:
        s = "+" + s[1:]  # -0.000 is printed +0.000
    return s.replace("-", "\u2212")


def _cell(f: dict) -> str:
    """mean delta [95% interval], wins/n as the README prints them: 3 decimals, 4 for an interval that would
    print as [0.000, 0.000]."""
    lo, hi = f["ci_low"], f["ci_high"]
    digits = 4 if _num(lo, 3).strip("+\u2212") == _num(hi, 3).strip("+\u2212") == "0.000" else 3
    return f"{_num(f['mean'], 3)} [{_num(lo, digits)}, {_num(hi, digits)}], {f['wins']}/{f['n']}"


def test_readme_synthetic_table_matches_the_example_summary():
    summary = json.loads((EXAMPLES / "synthetic_table_h100" / "report" / "summary.json").read_text())
    rows = _readme_synthetic_rows()
    assert set(rows) == set(summary["tasks"])
    for task, (baseline, fs_cell, rt_cell) in rows.items():
        t = summary["tasks"][task]
        base = [b["value"] for b in t["stages"]["seedcheck"]["baselines"].values()]
        assert baseline == f"{sum(base) / len(base):.3f}"
        assert fs_cell == _cell(t["seedcheck"]["finalists"]["scalar_l1_nodetach"]), task
        assert rt_cell == _cell(t["seedcheck"]["finalists"]["read_twice"]), task


def test_the_gpu_rounds_repeated_runs_reproduced():
    """On the H100, the seed check's seed-0 runs repeated the med stage's to the last bit (the README says so)."""
    summary = json.loads((EXAMPLES / "gpu_demo_h100" / "report" / "summary.json").read_text())
    groups = summary["repeats"]["groups"]
    assert len(groups) == 2 and all(g["identical"] for g in groups)
    assert {(g["task"], g["candidate"]) for g in groups} == {("sudoku4", "baseline"), ("sudoku4", "read_twice")}
