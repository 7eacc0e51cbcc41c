"""The multi-seed decision rules (orchestrator/decisions.py, run by orchestrator/planner.py): successive halving over
seeds, the sequential seed check on fresh seeds, failed seeds, controls, chance-level ties, thresholds in baseline
SDs; property tests over random specs and outcomes, and the default protocol's error rates from the simulator."""
from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.decisions import (CHANCE_TOLERANCE, HalvingRule, SequentialCheckRule, is_chance_tie,
                                    split_finalists, worst_value)
from orchestrator.planner import RunUnit, plan
from orchestrator.simulate import OutcomeModel, Scenario, default_protocol, simulate
from orchestrator.spec import SpecError, parse_spec
from orchestrator.stats import pocock_t_level

CHANCE = 0.25  # sudoku base 2, hole_acc: a cell drawn from 4 values


# ---------------------------------------------------------------------------------------------------------------------
# the rules alone
def test_pocock_level_keeps_the_error_rate_over_looks():
    looks = (4, 6, 8)
    c = pocock_t_level(looks, 0.05)
    assert 0.05 / 3 < c < 0.05
    rng = random.Random(99)  # an independent check: null sequences, any look crossing at level c
    rule = SequentialCheckRule(looks, 0.05)
    hits = 0
    trials = 4000
    for _ in range(trials):
        d = [rng.gauss(0, 1) for _ in range(looks[-1])]
        hits += any(rule.decide(d[:n], 0.0).label == "confirmed" for n in looks)
    assert hits / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert pocock_t_level((5,), 0.05) == 0.05


def test_sequential_rule_confirms_rejects_stops_and_continues():
    rule = SequentialCheckRule((4, 8), 0.05)
    assert rule.decide([1.0, 1.1, 0.9, 1.2], 0.0).label == "confirmed"
    assert rule.decide([-1.0, -1.1, -0.9, -1.2], 0.0).label == "rejected"
    assert rule.decide([-0.1, 0.3, -0.4, 0.1], 0.0).label == "inconclusive"  # futility: mean <= 0
    assert rule.decide([0.5, -0.3, 0.4, 0.1], 0.0).label == "continue"
    assert rule.decide([0.5, -0.3, 0.4, 0.1, 0.2, -0.2, 0.3, 0.0], 0.0).label == "inconclusive"  # the last look
    assert rule.decide([1.0, 1.1], 0.0).label == "continue"  # before the first look nothing is decided
    # the family: the same deltas at a stricter level (more finalist slots)
    d = [0.9, 1.4, 0.2, 1.0]
    assert SequentialCheckRule((4,), 0.05, 1).decide(d, 0.0).label == "confirmed"
    assert SequentialCheckRule((4,), 0.05, 8).decide(d, 0.0).label != "confirmed"


def test_halving_keeps_the_best_share_and_drops_the_credibly_worse():
    rule = HalvingRule(keep=0.5, drop_p=0.1)
    out = rule.rung("quick", {"a": [0.1], "b": [0.3], "c": [-0.2], "d": [0.0]}, 0.0, last=False)
    assert [n for n, d in out.items() if d.decision == "promote"] == ["a", "b"]
    out = rule.rung("quick", {"a": [-1.0, -1.1, -0.9], "b": [0.1, -0.1, 0.05]}, 0.0, last=True)
    assert out["a"].decision == "prune" and "credibly below" in out["a"].reason and out["b"].decision == "promote"
    out = rule.rung("quick", {"a": [0.2], "b": [0.1]}, 0.0, last=True, chance_ties=frozenset({"a"}))
    assert out["a"].decision == "prune" and "chance" in out["a"].reason and out["b"].decision == "promote"


def test_worst_value_chance_tie_and_finalist_quota():
    assert worst_value("hole_acc", [0.3, 0.5]) == 0.0 and worst_value("loss", [1.0, 2.5]) == 2.5
    assert is_chance_tie([0.2344, 0.2344], [0.2344, 0.25], CHANCE)
    assert not is_chance_tie([0.2344], [0.40], CHANCE) and not is_chance_tie([0.2], [0.2], None)
    assert split_finalists(["rt", "a", "b"], {"rt": 0.9, "a": 0.1, "b": 0.2}, {"rt"}, 1, 1) == ["b", "rt"]
    assert split_finalists(["rt", "a"], {"rt": 0.9, "a": 0.1}, {"rt"}, 1, 0) == ["a"]


# ---------------------------------------------------------------------------------------------------------------------
# specs
def spec_data(n_fs: int = 3, rungs: list[int] | None = None, looks: list[int] | None = None, med: bool = True,
              threshold: Any = 0.0, control: bool = True, max_finalists: int = 1, max_controls: int = 1) -> dict:
    rungs = rungs or [1, 2]
    cands: list[Any] = [{"name": f"c{i}", "fs": {"layer_start": 1, "alpha_init": -3.0 + 0.25 * i}}
                        for i in range(n_fs)]
    if control:
        cands.append("read_twice")
    stages: dict[str, Any] = {"quick": {"steps": 10, "eval_every": 5, "seeds": list(range(max(rungs))),
                                        "screen": {"rule": "halving", "keep": 0.5, "rungs": rungs}}}
    if med:
        stages["med"] = {"steps": 20, "eval_every": 10, "seeds": [0, 1], "screen": {"rule": "halving"}}
    stages["seedcheck"] = {"steps": 20, "eval_every": 10, "looks": looks or [2, 3, 4],
                           "max_finalists": max_finalists, "max_controls": max_controls}
    return {"round": "t", "model": {"preset": "tiny"}, "stages": stages,
            "tasks": {"su": {"task": "sudoku", "params": {"base": 2}, "batch": 8, "threshold": threshold,
                             "candidates": cands}}}


def test_spec_defaults_and_errors():
    spec = parse_spec(spec_data())
    sc = spec.stages.seedcheck
    assert sc.rule == "sequential" and sc.decide_on == "test" and min(sc.seeds) >= 1000
    assert spec.stages.quick.screen.rule == "halving" and spec.controls("su") == frozenset({"read_twice"})
    one_seed = spec_data()
    one_seed["stages"]["quick"] = {"steps": 10, "eval_every": 5, "seeds": [0]}
    assert parse_spec(one_seed).stages.quick.screen.rule == "threshold"  # nothing to halve over
    listed = spec_data()
    listed["stages"]["seedcheck"]["seeds"] = [0, 1, 2, 3, 4]
    assert parse_spec(listed).stages.seedcheck.rule == "fixed"  # the original's check on the listed seeds
    reused = spec_data()
    reused["stages"]["seedcheck"].update(rule="sequential", seeds=[0, 1, 2, 3, 4])
    with pytest.raises(SpecError, match="seed 0 also screens candidates"):
        parse_spec(reused)
    not_a_control = spec_data()
    not_a_control["tasks"]["su"]["candidates"][-1] = {"name": "read_twice", "control": False}
    assert parse_spec(not_a_control).controls("su") == frozenset()
    with pytest.raises(SpecError, match="threshold"):
        parse_spec(spec_data(threshold=-0.1))


# ---------------------------------------------------------------------------------------------------------------------
# a round driven with random outcomes
def run_round(spec, rng: random.Random, effect: dict[str, float], p_fail: float, p_base_fail: float,
              chance_prob: float) -> tuple[Any, list[dict]]:
    """Every runnable unit gets a record until the plan is finished: values near chance with `chance_prob` (per
    seed, for the baseline and every candidate alike), failures and diverged runs at random."""
    records: list[dict] = []
    at_chance: dict[tuple, bool] = {}
    for _ in range(500):
        p = plan(spec, records)
        if p.finished:
            return p, records
        assert p.runnable, p.task_state
        for u in p.runnable:
            records.append(record(u, rng, effect, p_fail, p_base_fail, chance_prob, at_chance))
    raise AssertionError("the round did not finish")


def record(u: RunUnit, rng: random.Random, effect: dict[str, float], p_fail: float, p_base_fail: float,
           chance_prob: float, at_chance: dict[tuple, bool]) -> dict:
    key = (u.stage, u.seed)
    if key not in at_chance:
        at_chance[key] = rng.random() < chance_prob
    if at_chance[key]:
        value = CHANCE - rng.choice([0.0, 0.0156])
    else:
        value = 0.5 + effect.get(u.candidate.name, 0.0) + rng.gauss(0, 0.05)
    status = "ok"
    if rng.random() < (p_base_fail if u.is_baseline else p_fail):
        status = rng.choice(["failed", "diverged"])
    ok = status == "ok"
    return {"run_key": u.run_key, "status": status, "value": value if ok else None, "metric": "hole_acc",
            "test": {"test_hole_acc": value + rng.gauss(0, 0.01)} if ok else {},
            "stage": u.stage, "seed": u.seed, "candidate": u.candidate.name}


@st.composite
def rounds(draw):
    n_fs = draw(st.integers(1, 5))
    rungs = draw(st.sampled_from([[1], [1, 2], [1, 3], [2, 4], [1, 2, 3]]))
    looks = draw(st.sampled_from([[2], [2, 3], [3, 5], [2, 4, 6]]))
    data = spec_data(n_fs, rungs, looks, med=draw(st.booleans()), control=draw(st.booleans()),
                     max_finalists=draw(st.integers(1, 3)), max_controls=draw(st.integers(0, 2)),
                     threshold=draw(st.sampled_from([0.0, 0.01, {"sd": 0.5, "calibration_seeds": 2}])))
    effects = {f"c{i}": draw(st.sampled_from([0.0, 0.0, 0.05, 0.2, -0.1])) for i in range(n_fs)}
    effects["read_twice"] = draw(st.sampled_from([0.0, 0.1]))
    return (parse_spec(data), effects, draw(st.integers(0, 2 ** 32 - 1)), draw(st.sampled_from([0.0, 0.15])),
            draw(st.sampled_from([0.0, 0.1])), draw(st.sampled_from([0.0, 0.5, 1.0])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds())
def test_round_invariants(case):
    spec, effects, seed, p_fail, p_base_fail, chance_prob = case
    p, records = run_round(spec, random.Random(seed), effects, p_fail, p_base_fail, chance_prob)
    by_key = {(r["stage"], r["candidate"], r["seed"]): r for r in records}
    sc = spec.stages.seedcheck
    decisions = [d for d in p.decisions if d.task == "su"]
    selecting: dict[str, set[int]] = {}
    for d in decisions:
        if d.stage != "seedcheck":
            selecting.setdefault(d.candidate, set()).update(d.deltas)
    for d in decisions:
        base_ok = {s for s in d.deltas if by_key.get((d.stage, "baseline", s), {}).get("status") == "ok"}
        # a failed or diverged candidate seed is never dropped: it has a delta (its worst value) where the pair exists
        for (stage, cand, s), r in by_key.items():
            if stage == d.stage and cand == d.candidate and r["status"] != "ok" and \
                    by_key.get((stage, "baseline", s), {}).get("status") == "ok" and s in base_ok | set(d.deltas):
                assert d.deltas.get(s) is not None and s in d.worst_seeds, (d, s)
        if d.stage == "seedcheck":
            # confirmation never reuses a seed that selected the candidate
            assert not set(d.deltas) & selecting.get(d.candidate, set()), d
            assert not set(d.deltas) & {s for st_ in (spec.stages.quick, spec.stages.med) if st_ for s in st_.seeds}
            # never confirmed on fewer pairs than the rule needs
            if d.label == "confirmed":
                assert sum(v is not None for v in d.deltas.values()) >= sc.looks[0], d
        if d.decision == "promote":
            # a tie at chance is never promoted
            cand = [by_key[(d.stage, d.candidate, s)]["value"] for s in d.deltas
                    if by_key[(d.stage, d.candidate, s)]["status"] == "ok"]
            base = [by_key[(d.stage, "baseline", s)]["value"] for s in d.deltas]
            assert not is_chance_tie(cand, base, CHANCE, "hole_acc", CHANCE_TOLERANCE), d
    # controls never take an FS finalist slot
    ts = p.tasks["su"]
    controls = spec.controls("su")
    fs_final = [n for n in ts.finalists if n not in controls]
    ctl_final = [n for n in ts.finalists if n in controls]
    assert len(fs_final) <= sc.max_finalists and len(ctl_final) <= sc.max_controls
    last_gate = [d for d in decisions if d.stage in ("quick", "med")]
    if last_gate and ts.status == "done":
        stage = last_gate[-1].stage
        fs_promoted = [d.candidate for d in last_gate if d.stage == stage and d.decision == "promote"
                       and d.candidate not in controls]
        assert len(fs_final) == min(sc.max_finalists, len(fs_promoted))


def test_a_baseline_seed_that_fails_removes_its_pair_visibly():
    spec = parse_spec(spec_data(n_fs=1, control=False, med=False, rungs=[1], looks=[2]))
    pool = spec.stages.seedcheck.seeds

    def outcome(u: RunUnit) -> dict:
        bad = u.is_baseline and u.stage == "seedcheck" and u.seed == pool[0]
        v = 0.6 if not u.is_baseline else 0.5
        return {"run_key": u.run_key, "status": "failed" if bad else "ok", "value": None if bad else v,
                "metric": "hole_acc", "test": {} if bad else {"test_hole_acc": v + 0.01 * (u.seed % 3)}}

    records: list[dict] = []
    for _ in range(50):
        p = plan(spec, records)
        if p.finished:
            break
        records += [outcome(u) for u in p.runnable]
    (d,) = [d for d in p.decisions if d.stage == "seedcheck"]
    assert d.removed_pairs == [pool[0]] and "pair(s) removed" in d.reason
    assert sorted(d.deltas) == pool[1:3]  # the next pool seeds keep the look's two pairs


def test_threshold_in_baseline_sds_is_measured_on_the_quick_baselines():
    spec = parse_spec(spec_data(n_fs=1, control=False, med=False, threshold={"sd": 2.0, "calibration_seeds": 2}))
    p = plan(spec, [])
    assert [(u.candidate.name, u.seed) for u in p.runnable] == [("baseline", 0), ("baseline", 1)]
    recs = [{"run_key": u.run_key, "status": "ok", "value": v, "metric": "hole_acc"}
            for u, v in zip(p.runnable, (0.4, 0.6))]
    p = plan(spec, recs)
    sd = math.sqrt(0.02)
    assert p.tasks["su"].threshold == pytest.approx(2.0 * sd) and "baseline SD" in p.tasks["su"].calibration
    assert {u.candidate.name for u in p.runnable} == {"c0"}  # the calibration baselines are the matched ones


# ---------------------------------------------------------------------------------------------------------------------
# the default protocol's error rates (noise: paired-delta SD 1 at every stage, the same effect at every stage)
def _rates(replicates: int, seed: int):
    protocol = default_protocol()
    model = OutcomeModel.uniform(protocol.spec)
    null = simulate(protocol, model, Scenario.null(), replicates=replicates, seed=seed)
    real = simulate(protocol, model, Scenario.one_real(8, 1.0), replicates=replicates, seed=seed + 1)
    return null, real


def _meets_targets(null, real, z: float) -> None:
    assert null.fwer.value - z * null.fwer.se <= 0.05, null.fwer
    assert real.power.value + z * real.power.se >= 0.80, real.power
    for cost in (null.cost_per_candidate, real.cost_per_candidate):
        assert cost.value - z * cost.se <= 5.0, cost


def test_default_protocol_meets_the_targets():
    null, real = _rates(150, 21)
    _meets_targets(null, real, z=3.0)
    assert real.p_finalist_real.value > null.p_finalist_null.value


@pytest.mark.slow
def test_default_protocol_meets_the_targets_precisely():
    null, real = _rates(2000, 31)
    _meets_targets(null, real, z=2.0)


def test_a_halving_stage_with_everyone_out_runs_no_later_rung():
    """Every candidate a tie at chance on the first rung: the stage ends there, without the second seed's baseline."""
    spec = parse_spec(spec_data(n_fs=2, control=False, med=False, rungs=[1, 2]))
    records: list[dict] = []
    for _ in range(10):
        p = plan(spec, records)
        if p.finished:
            break
        records += [{"run_key": u.run_key, "status": "ok", "value": CHANCE - 0.0156, "metric": "hole_acc",
                     "test": {"test_hole_acc": CHANCE}, "seed": u.seed} for u in p.runnable]
    assert p.finished and p.tasks["su"].reason.startswith("no candidate passed quick")
    assert {r["seed"] for r in records} == {0}
