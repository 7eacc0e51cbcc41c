"""End to end with the real worker (`python -m worker`): a tiny CPU round (tiny preset, sudoku, quick
stage), one candidate made to run out of memory once (the worker's fault hook) so the halved micro-batch is exercised
through torch; then the study, the records and a rerun."""
from __future__ import annotations

import json
import sys

import optuna
import pytest
from optuna.trial import TrialState

from orchestrator.records import Ledger
from orchestrator.study import default_storage_url

pytest.importorskip("torch")


@pytest.mark.slow  # four worker processes, each importing torch: about 22 s on a quiet 2-core dev machine, minutes on a busy one
def test_tiny_round_with_the_real_worker(write_spec, monkeypatch, tmp_path, round_runner):
    monkeypatch.setenv("FSEARCH_WORKER_CMD", f"{sys.executable} -m worker")
    monkeypatch.setenv("FSEARCH_FAULTS", json.dumps({"*.scalar_l1_trainable.*": "oom"}))
    monkeypatch.delenv("FSEARCH_KILL_AT", raising=False)
    spec = write_spec({"stages!": {"quick": {"steps": 4, "eval_every": 2, "seeds": [0]}},
                       "defaults": {"lr": {"model": 3.0e-3}},
                       "tasks": {"sud": {"batch": 4, "candidates": ["scalar_l1_trainable", "read_twice"]}}})
    _, records = round_runner(spec)
    rd = tmp_path / "results" / "r"
    assert [(r.candidate, r.status) for r in records] == [("baseline", "ok"), ("scalar_l1_trainable", "ok"),
                                                          ("read_twice", "ok")]
    base, fs, rt = records
    assert (fs.micro_batch, fs.grad_accum, fs.attempt) == (2, 2, 1)  # torch OOM -> halved, same effective batch
    assert (base.micro_batch, base.grad_accum) == (4, 1)
    for r in records:
        assert r.steps == r.budget_steps == 4 and r.device == "cpu" and r.metric == "hole_acc" and r.compiled is False
        assert r.value == r.final["val_hole_acc"] and r.best_step in (0, 2, 4)
        assert r.best_val_loss == r.best["val_loss"] and set(r.test) >= {"test_loss", "test_hole_acc"}
    assert fs.delta == pytest.approx(fs.value - base.value) and fs.baseline_key == base.run_key
    assert fs.decision == ("promote" if fs.delta >= 0.0 else "prune")
    trials = optuna.load_study(study_name="r", storage=default_storage_url(rd)).trials
    assert len(trials) == 3 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert trials[1].user_attrs["attempts"][0]["outcome"] == "oom"
    _, again = round_runner(spec)
    assert again == records == Ledger(rd / "records.jsonl").read()


# not slow: one worker process importing torch, about 12 s on the 2-core dev machine
def test_real_worker_accepts_the_probe_request_and_cpu_falls_back_to_cpu_batch(write_spec, monkeypatch, tmp_path,
                                                                                round_runner):
    """On a machine without CUDA the real worker parses the scheduler's probe request, then says it needs a CUDA
    device (kind config); with device auto and defaults.probe.cpu_batch set, the round uses that batch, saying so."""
    import io

    from orchestrator.progress import PlainDisplay

    monkeypatch.setenv("FSEARCH_WORKER_CMD", f"{sys.executable} -m worker")
    monkeypatch.delenv("FSEARCH_FAULTS", raising=False)
    spec = write_spec({"stages!": {"quick": {"steps": 2, "eval_every": 1, "seeds": [0]}},
                       "defaults": {"device": "auto", "probe": {"cpu_batch": 2, "micro_batches": [8, 4]}},
                       "tasks": {"sud": {"batch": "auto", "candidates": ["scalar_l1_nodetach"]}}})
    out = io.StringIO()
    _, records = round_runner(spec, display=PlainDisplay(out))
    rd = tmp_path / "results" / "r"
    probe = json.loads((rd / "probe" / "sud.json").read_text())
    assert probe["micro_batch"] == 2 and "needs a CUDA device" in probe["source"]
    assert "batch auto -> defaults.probe.cpu_batch = 2" in out.getvalue()
    assert [(r.candidate, r.batch_size, r.status) for r in records] == [("baseline", 2, "ok"),
                                                                         ("scalar_l1_nodetach", 2, "ok")]
