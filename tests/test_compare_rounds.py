"""scripts/compare_rounds.py on two tiny ledgers: identical rounds pass, a changed value, decision or run key is
named, fields that differ between executions are ignored, bad input is one line with exit 2."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.records import Ledger, Record

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_rounds.py"
_spec = importlib.util.spec_from_file_location("compare_rounds", SCRIPT)
compare_rounds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_rounds)


def record(candidate: str, **changes) -> Record:
    baseline = candidate == "baseline"
    fields = dict(round="demo", task="sud", task_kind="sudoku", stage="quick", candidate=candidate,
                  mode="baseline" if baseline else "prompt_fs", seed=0, run_key=f"sud.quick.{candidate}.s0-0123456789",
                  attempt=0, fs=None if baseline else {"variant": "scalar", "layer_start": 1}, batch_size=16,
                  micro_batch=16, grad_accum=1, steps=30, budget_steps=30, eval_every=15, n_val=32, data_seed=0,
                  status="ok", metric="hole_acc", value=0.25, final={"val_loss": 2.5, "val_hole_acc": 0.25},
                  best={"val_loss": 2.4, "val_hole_acc": 0.25}, best_step=15, test={"test_hole_acc": 0.3},
                  baseline_key=None if baseline else "sud.quick.baseline.s0-0123456789",
                  baseline_value=None if baseline else 0.2, delta=None if baseline else 0.05,
                  threshold=None if baseline else 0.0, decision="baseline" if baseline else "promote",
                  wall_s=3.0, tokens_per_s=1000.0, run_dir=f"/round/runs/{candidate}",
                  finished_at="2026-01-01T00:00:00")
    fields.update(changes)
    return Record(**fields)


def write_round(folder: Path, records: list[Record]) -> Path:
    ledger = Ledger(folder / "records.jsonl")
    for r in records:
        ledger.append(r)
    return folder


def run(a: Path, b: Path, *extra: str, capsys) -> tuple[int, str]:
    code = compare_rounds.main([str(a), str(b), *extra])
    return code, capsys.readouterr().out


@pytest.fixture
def round_a(tmp_path: Path) -> Path:
    return write_round(tmp_path / "a", [record("baseline"), record("l1")])


def test_identical_rounds_apart_from_execution_fields(tmp_path: Path, round_a: Path, capsys) -> None:
    # another execution: other times, folder, device, attempt, and the records appended in another order
    rerun = [record(c, wall_s=9.5, tokens_per_s=12.0, run_dir=f"/elsewhere/{c}", finished_at="2026-02-02T00:00:00",
                    peak_mem_bytes=123, device="cuda", attempt=1, round="demo_rerun") for c in ("l1", "baseline")]
    round_b = write_round(tmp_path / "b", rerun)
    code, out = run(round_a, round_b, capsys=capsys)
    assert code == 0, out
    assert "identical: 2 runs" in out


def test_a_changed_value_and_decision_are_named(tmp_path: Path, round_a: Path, capsys) -> None:
    round_b = write_round(tmp_path / "b", [record("baseline"), record("l1", value=0.2, delta=0.0, decision="prune",
                                                                      final={"val_loss": 2.5, "val_hole_acc": 0.2})])
    code, out = run(round_a, round_b, capsys=capsys)
    assert code == 1
    key = "sud.quick.l1.s0-0123456789"
    for line in (f"{key}: value: 0.25 -> 0.2", f"{key}: delta: 0.05 -> 0.0", f"{key}: decision: 'promote' -> 'prune'",
                 f"{key}: final.val_hole_acc: 0.25 -> 0.2"):
        assert line in out.splitlines(), out
    assert "final.val_loss" not in out
    assert "different: 4 differences in 1 runs" in out


def test_a_changed_run_key_is_named_on_both_sides(tmp_path: Path, round_a: Path, capsys) -> None:
    round_b = write_round(tmp_path / "b", [record("baseline"), record("l1", run_key="sud.quick.l1.s0-9999999999")])
    code, out = run(round_a, round_b, capsys=capsys)
    assert code == 1
    assert "sud.quick.l1.s0-0123456789: only in A" in out.splitlines()
    assert "sud.quick.l1.s0-9999999999: only in B" in out.splitlines()


def test_a_metric_missing_on_one_side_and_ignore(tmp_path: Path, round_a: Path, capsys) -> None:
    round_b = write_round(tmp_path / "b", [record("baseline"), record("l1", test={}, sandbox="enforced")])
    code, out = run(round_a, round_b, capsys=capsys)
    assert code == 1
    assert "sud.quick.l1.s0-0123456789: test.test_hole_acc: 0.3 -> <absent>" in out.splitlines()
    assert "sud.quick.l1.s0-0123456789: sandbox: None -> 'enforced'" in out.splitlines()
    code, out = run(round_a, round_b, "--ignore", "test", "--ignore", "sandbox", capsys=capsys)
    assert code == 0, out


@pytest.mark.parametrize("args, message", [
    (["{a}", "{missing}"], "is neither a round folder nor a file"),
    (["{a}", "{empty_dir}"], "has no records.jsonl"),
    (["{a}", "{a}", "--ignore", "wall"], "--ignore wall: not a record field"),
    (["{a}", "{corrupt}"], "line 1 is not a valid record"),
    (["{a}"], "required"),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, round_a: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"not": "a record"}\n' + record("l1").to_line() + "\n")
    paths = {"a": round_a, "missing": tmp_path / "nowhere", "empty_dir": tmp_path / "empty", "corrupt": corrupt}
    argv = [a.format(**paths) for a in args]
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
