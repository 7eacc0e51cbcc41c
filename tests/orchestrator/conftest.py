"""Fixtures for the control-plane tests: record factory, fake worker command, tiny specs, CLI runner helpers."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from orchestrator.records import Record, utc_now

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FAKE_WORKER = HERE / "fake_worker.py"


def _make_record(i: int = 0, **kw) -> Record:
    fields = dict(round="r", task="t", task_kind="sudoku", stage="quick", candidate=f"c{i}", mode="prompt_fs", seed=0,
                  run_key=f"t.quick.c{i}.s0-abc", attempt=0, fs={"variant": "scalar", "layer_start": 2},
                  batch_size=8, micro_batch=4, grad_accum=2, steps=10, budget_steps=10, eval_every=5, n_val=16,
                  data_seed=0, status="ok", metric="hole_acc", value=0.5 + i / 100,
                  final={"val_loss": 1.0, "val_hole_acc": 0.5 + i / 100},
                  best={"val_loss": 0.9, "val_tok_acc": 0.7, "val_hole_acc": 0.6}, best_step=5,
                  test={"test_loss": 1.1}, baseline_key="t.quick.baseline.s0-abc", baseline_value=0.5, delta=i / 100,
                  threshold=0.01, decision="promote", run_dir=f"/x/{i}", finished_at=utc_now(), best_val_loss=0.9,
                  best_val_tok_acc=0.7)
    fields.update(kw)
    return Record(**fields)


@pytest.fixture
def make_record():
    return _make_record


@pytest.fixture
def fake_worker_cmd() -> str:
    return f"{sys.executable} {FAKE_WORKER}"
