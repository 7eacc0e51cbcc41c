"""A comparison round (seedcheck only: every candidate on every seed, nothing pruned) end to end with the real worker
(`python -m worker`) on CPU at tiny size, with a reshaped from-scratch model; then its status, report,
report check and export. Plus the worker building a reshaped preset."""
from __future__ import annotations

import json
import sys

import pytest

from orchestrator.planner import plan
from orchestrator.spec import load_spec

pytest.importorskip("torch")

SHAPE = {"n_layer": 2, "n_embd": 32, "head_size": 16}
SEEDS = [0, 1, 2, 3, 4]


# not slow: 15 worker processes, each importing torch, about 25 s on the 2-core dev machine
def test_comparison_round_with_the_real_worker(write_spec, monkeypatch, tmp_path, round_runner):
    from orchestrator.export import export_round
    from orchestrator.progress import round_status
    from orchestrator.report import check_report, write_report

    monkeypatch.setenv("FSEARCH_WORKER_CMD", f"{sys.executable} -m worker")
    monkeypatch.delenv("FSEARCH_FAULTS", raising=False)
    monkeypatch.delenv("FSEARCH_KILL_AT", raising=False)
    path = write_spec({"model": {"preset": "tiny", "shape": SHAPE},
                       "defaults": {"lr": {"model": 3.0e-3}},
                       "stages!": {"seedcheck": {"steps": 3, "eval_every": 3, "seeds": SEEDS, "max_finalists": 2}},
                       "tasks!": {"rc": {"task": "rightcopy", "params": {"length": 4}, "batch": 4, "threshold": 0.0,
                                         "candidates": ["scalar_l1_trainable", "read_twice"]}}})
    _, records = round_runner(path)
    rd = tmp_path / "results" / "r"
    # every candidate on every seed, after the baselines; each compared with the baseline of its own seed
    assert [(r.candidate, r.seed) for r in records] == [(c, s) for c in ("baseline", "scalar_l1_trainable",
                                                                         "read_twice") for s in SEEDS]
    assert all(r.status == "ok" and r.stage == "seedcheck" and r.steps == 3 for r in records)
    base = {r.seed: r for r in records if r.candidate == "baseline"}
    for r in records:
        if r.candidate != "baseline":
            assert r.baseline_key == base[r.seed].run_key and r.decision == "recorded"
            assert r.delta == pytest.approx(r.value - base[r.seed].value)
    # the worker ran the reshaped model, and the shape is part of every run's configuration
    config = json.loads((rd / "runs" / records[0].run_key / "attempt-0" / "config.json").read_text())
    assert config["model"] == {"preset": "tiny", "checkpoint": None, "shape": SHAPE}  # init follows the seed
    p = plan(load_spec(path), records)
    assert p.finished and p.runnable == [] and p.tasks["rc"].finalists == ["scalar_l1_trainable", "read_twice"]
    assert all(c.status == "finalist" for c in p.tasks["rc"].candidates.values())

    st = round_status(rd)
    assert [(r.stage, r.state, r.done, r.total, r.pruned) for r in st.rows] == [("seedcheck", "complete", 15, 15, 0)]
    write_report(rd)
    summary = json.loads((rd / "report" / "summary.json").read_text())
    assert summary["kind"] == "comparison" and summary["problems"] == []
    fin = summary["tasks"]["rc"]["seedcheck"]["finalists"]
    assert list(fin) == ["scalar_l1_trainable", "read_twice"] and all(f["n"] == 5 for f in fin.values())
    assert check_report(rd) == []
    assert len(export_round(rd, "jsonl").read_text().splitlines()) == 15


def test_the_worker_builds_the_reshaped_preset(tmp_path):
    import torch

    from orchestrator.runconfig import ModelSource, RunConfig
    from worker.run import Run

    cfg = RunConfig(run_key="k", task="t", task_kind="rightcopy", candidate="baseline", mode="baseline",
                    model=ModelSource(preset="tiny", shape=SHAPE), steps=1, eval_every=1, batch_size=2,
                    device="cpu", run_dir=str(tmp_path / "run"))
    run = Run(cfg)
    run.device = torch.device("cpu")
    model = run.build_model()
    c = model.cfg
    assert (c.n_layer, c.n_embd, c.head_size, c.n_head) == (2, 32, 16, 2)
    assert c == ModelSource(preset="tiny", shape=SHAPE).build_config()
    assert sum(1 for name, _ in model.named_parameters() if name.endswith("ln1.weight")) == 2
