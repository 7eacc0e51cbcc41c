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


@pytest.fixture(scope="session")
def fake_worker_cmd() -> str:
    return f"{sys.executable} {FAKE_WORKER}"


# ---------------------------------------------------------------------------------------------------------------------
# tiny rounds driven by the fake worker

import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402

import yaml  # noqa: E402

SUDOKU = {"base": 2, "mask_count": 4, "mask_region": "random"}
EFFECTS = {"scalar_l1_trainable": 0.02, "scalar_l2_trainable": -0.02, "scalar_l3_trainable": 0.01}

TINY_SPEC = {
    "round": "r",
    "model": {"preset": "tiny"},
    "defaults": {"n_val": 8, "n_test": 8, "device": "cpu", "time_limit_s": 60, "retries": 2, "baseline_retries": 1},
    "stages": {
        "quick": {"steps": 4, "eval_every": 2, "seeds": [0]},
        "seedcheck": {"steps": 6, "eval_every": 3, "seeds": [0, 1], "max_finalists": 1, "allow_few_seeds": True},
    },
    "tasks": {
        "sud": {"task": "sudoku", "params": SUDOKU, "batch": 8, "threshold": 0.0,
                "candidates": ["scalar_l1_trainable", "scalar_l2_trainable"]},
    },
}


def deep_update(base: dict, changes: dict) -> dict:
    """Merge `changes` into a copy of `base`; a key written "name!" replaces instead of merging."""
    out = copy.deepcopy(base)
    for k, v in changes.items():
        if k.endswith("!"):
            out[k[:-1]] = copy.deepcopy(v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(changes=None, name="spec.yaml", base=TINY_SPEC) -> path of a spec whose output is tmp_path/results."""

    def write(changes: dict | None = None, name: str = "spec.yaml", base: dict = TINY_SPEC) -> Path:
        data = deep_update(base, {"output": str(tmp_path / "results"), **(changes or {})})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture
def fake_env(monkeypatch, fake_worker_cmd):
    """Environment for rounds run in this process: fake worker, deterministic effects, no sleeping."""
    monkeypatch.setenv("FSEARCH_WORKER_CMD", fake_worker_cmd)
    monkeypatch.setenv("FAKE_WORKER_EFFECTS", json.dumps(EFFECTS))
    monkeypatch.setenv("FAKE_WORKER_STEP_S", "0")
    monkeypatch.delenv("FSEARCH_FAULTS", raising=False)
    monkeypatch.delenv("FSEARCH_KILL_AT", raising=False)
    return monkeypatch


def run_round(spec_path: Path, **kw):
    """Run a round in this process (needs fake_env); returns (scheduler, records)."""
    from orchestrator.scheduler import RoundScheduler
    from orchestrator.spec import load_spec

    spec = load_spec(spec_path)
    sched = RoundScheduler(spec, poll_s=0.02, term_grace_s=1.0, **kw)
    return sched, sched.run()


@pytest.fixture(scope="session")
def round_runner():
    return run_round


@pytest.fixture(scope="session")
def tiny_spec():
    return copy.deepcopy(TINY_SPEC), dict(EFFECTS)


def cli_env(extra: dict | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("FSEARCH_FAULTS", "FSEARCH_KILL_AT"):
        env.pop(k, None)
    env.update({"FSEARCH_WORKER_CMD": f"{sys.executable} {FAKE_WORKER}", "FAKE_WORKER_EFFECTS": json.dumps(EFFECTS),
                "FAKE_WORKER_STEP_S": "0", "PYTHONPATH": str(REPO)})
    env.update(extra or {})
    return env


def fsearch(*args: str, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """`fsearch ARGS` in a subprocess (python -m orchestrator.cli) with the fake worker."""
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=cli_env(env),
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture
def fsearch_cli():
    return fsearch


@pytest.fixture
def cli_environ():
    return cli_env
