"""`fsearch simulate` (orchestrator/simulate.py): the simulator runs the real planner and seed-check rule, and it
reproduces the error rates of today's default protocol."""
from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest

from orchestrator import decisions, planner
from orchestrator.records import Ledger
from orchestrator.simulate import (OutcomeModel, Protocol, Scenario, default_protocol, original_protocol, memoized_pure_functions,
                                   noise_from_round, run_replicate, simulate)
from orchestrator.spec import parse_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "results" / "examples"
REFERENCE_REPLICATES = 40_000  # the reference numbers' own simulation


def _close(measured, reference: float, trials: int, z: float = 3.5) -> None:
    """`measured` agrees with `reference` within z binomial SEs (of this simulation and of the reference's)."""
    var = reference * (1 - reference)
    se = math.sqrt(var / trials + var / REFERENCE_REPLICATES)
    assert abs(measured.value - reference) <= z * se, (measured, reference, se)


def test_reproduces_todays_default_protocol():
    """1-seed quick, 1-seed med, 5-seed check repeating the med run on seed 0, 8 candidates, <= 3 finalists, per-seed
    delta = effect + N(0, 1) at every stage: P(confirm | null) 0.43% per candidate, 3.1% family-wise, 20% at +1 SD."""
    protocol = original_protocol()
    model = OutcomeModel.uniform(protocol.spec)
    null = simulate(protocol, model, Scenario.null(), replicates=500, seed=11)
    real = simulate(protocol, model, Scenario.one_real(8, 1.0), replicates=500, seed=12)
    _close(null.p_confirm_null, 0.0043, 500 * 8)
    _close(null.fwer, 0.031, 500)
    _close(real.power, 0.20, 500)
    assert null.power.value is None and real.fwer.value is not None


@pytest.mark.slow
def test_reproduces_todays_default_protocol_at_half_sd():
    protocol = original_protocol()
    model = OutcomeModel.uniform(protocol.spec)
    half = simulate(protocol, model, Scenario.one_real(8, 0.5), replicates=4000, seed=13)
    _close(half.power, 0.044, 4000)
    _close(half.false_share, 0.41, int(4000 * 0.075), z=4.0)


def _promotion(monkeypatch, always: bool) -> None:
    """Replace the planner's promotion test (wherever the planner reads it from)."""
    for module in (planner, decisions):
        if hasattr(module, "meets_threshold"):
            monkeypatch.setattr(module, "meets_threshold", lambda delta, threshold: always)


def test_drives_the_real_planner(monkeypatch):
    protocol = original_protocol()
    model = OutcomeModel.uniform(protocol.spec)
    base = simulate(protocol, model, Scenario.one_real(8, 2.0), replicates=60, seed=3)
    assert 0 < base.p_finalist_null.value < 1

    _promotion(monkeypatch, False)  # nothing passes the quick screen
    none = simulate(protocol, model, Scenario.one_real(8, 2.0), replicates=60, seed=3)
    assert none.power.value == 0 and none.p_finalist_real.value == 0
    assert none.stage_runs == {"quick": 9}

    _promotion(monkeypatch, True)  # everything passes both screens: always 3 finalists (the best med deltas)
    every = simulate(protocol, model, Scenario.one_real(8, 2.0), replicates=60, seed=3)
    assert sum(every.decisions.values()) == 3 and every.p_finalist_null.value > base.p_finalist_null.value
    assert every.stage_runs == {"quick": 9, "med": 9, "seedcheck": 5 + 3 * 5}


def test_seedcheck_decision_follows_the_rule(monkeypatch):
    """The seed-check decision comes from the rule object: a rule that needs more pairs than the check has
    confirms nothing."""
    protocol = original_protocol()
    model = OutcomeModel.uniform(protocol.spec)
    strict = Protocol(protocol.name, protocol.spec, type(protocol.rule)(min_pairs=6))
    r = simulate(strict, model, Scenario.one_real(8, 3.0), replicates=40, seed=5)
    assert r.power.value == 0 and r.decisions["confirmed"] == 0 and r.decisions["inconclusive"] > 0


def test_seed_check_repeats_the_med_training_on_seed_zero():
    protocol = original_protocol()
    for identical in (True, False):
        model = OutcomeModel.uniform(protocol.spec, repeats_identical=identical)
        for rep in range(20):
            out = run_replicate(protocol, model, Scenario.null(), random.Random(rep))
            med = {d.candidate: d.deltas[0] for d in out.stage_decisions if d.stage == "med"}
            check = {d.candidate: d.deltas[0] for d in out.stage_decisions if d.stage == "seedcheck"}
            for name, delta in check.items():
                assert (delta == med[name]) is identical


def test_memoised_pure_functions_change_no_result():
    protocol = original_protocol()
    model = OutcomeModel.uniform(protocol.spec)
    plain = [run_replicate(protocol, model, Scenario.one_real(8, 1.0), random.Random(i)) for i in range(8)]
    with memoized_pure_functions():
        fast = [run_replicate(protocol, model, Scenario.one_real(8, 1.0), random.Random(i)) for i in range(8)]
    assert [(o.seedcheck, o.runs, o.stage_decisions) for o in plain] == \
           [(o.seedcheck, o.runs, o.stage_decisions) for o in fast]


def test_same_seed_same_result_and_costs_count_baselines():
    protocol = original_protocol()
    model = OutcomeModel.uniform(protocol.spec)
    a = simulate(protocol, model, Scenario.null(), replicates=30, seed=7)
    b = simulate(protocol, model, Scenario.null(), replicates=30, seed=7)
    assert a.as_dict() | {"seconds": 0} == b.as_dict() | {"seconds": 0}
    runs = sum(a.stage_runs.values())
    assert a.runs_per_candidate.value == pytest.approx(runs / 8)
    cost = (0.4 * a.stage_runs["quick"] + a.stage_runs.get("med", 0) + a.stage_runs.get("seedcheck", 0)) / 8
    assert a.cost_per_candidate.value == pytest.approx(cost)


def test_diverged_runs_and_multi_task_specs_finish():
    data = {"round": "x", "model": {"preset": "tiny"},
            "stages": {"quick": {"steps": 10, "eval_every": 10, "seeds": [0, 1]},
                       "seedcheck": {"steps": 20, "eval_every": 20, "seeds": [0, 1, 2, 3, 4], "max_finalists": 2}},
            "tasks": {label: {"task": "sudoku", "params": {"base": 2}, "batch": "auto", "threshold": 0.01,
                              "candidates": ["scalar_l1_trainable", "scalar_l2_trainable", "read_twice"]}
                      for label in ("a", "b")}}
    protocol = Protocol.from_spec(parse_spec(data))
    model = OutcomeModel.uniform(protocol.spec, diverge_prob=0.2)
    r = simulate(protocol, model, Scenario.one_real(3, 2.0), replicates=30, seed=1)
    assert r.n_candidates == 6 and r.stage_runs["quick"] < 2 * (2 + 2 * 3) + 1e-9


def test_noise_from_a_finished_round():
    round_dir = EXAMPLES / "synthetic_table_h100"
    noise = noise_from_round(round_dir)
    recs = [r for r in Ledger(round_dir / "records.jsonl").read() if r.status == "ok"]
    for task in ("kvsort20", "rightcopy16"):
        by_cand: dict[str, list[float]] = {}
        for r in recs:
            if r.task == task and r.delta is not None:
                by_cand.setdefault(r.candidate, []).append(r.delta)
        dfs = [len(v) - 1 for v in by_cand.values()]
        pooled = math.sqrt(sum(d * statistics.variance(v) for d, v in zip(dfs, by_cand.values())) / sum(dfs))
        assert noise.task_sd[task]["seedcheck"] == pytest.approx(pooled)
    assert noise.wall_s["seedcheck"] == pytest.approx(statistics.median(r.wall_s for r in recs))


def test_simulate_command_json(tmp_path):
    from orchestrator.cli import main

    png = tmp_path / "power.png"
    out = tmp_path / "out.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["simulate", "--replicates", "20", "--effects", "1", "--json", "--png", str(png),
                     "--noise-from", str(EXAMPLES / "gpu_demo_h100")])
    assert code == 0
    out.write_text(buf.getvalue())
    data = json.loads(out.read_text())
    # without a spec: the original's protocol beside the default one, each under both scenarios
    assert [(r["protocol"], r["scenario"]) for r in data["results"]] == [
        ("original", "all null"), ("original", "one at +1 SD"), ("default", "all null"), ("default", "one at +1 SD")]
    assert png.stat().st_size > 0
