"""The planner (orchestrator/planner.py): every decision tested with fake records, no training."""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import pytest

from orchestrator.decisions import meets_threshold
from orchestrator.planner import RunUnit, judge, plan, stage_table
from orchestrator.records import Record, utc_now
from orchestrator.runconfig import RunConfig
from orchestrator.runkey import RunKey, parse_run_key, short_hash
from orchestrator.spec import parse_spec

BASE = {
    "round": "t",
    "model": {"preset": "tiny"},
    "stages": {
        # the original's rules (these tests pin them; test_protocol.py tests the multi-seed ones)
        "quick": {"steps": 10, "eval_every": 5, "seeds": [0], "screen": {"rule": "threshold"}},
        "med": {"steps": 20, "eval_every": 5, "seeds": [0], "screen": {"rule": "threshold"}},
        "seedcheck": {"steps": 20, "eval_every": 10, "seeds": [0, 1, 2, 3, 4], "max_finalists": 2},
    },
    "tasks": {
        "su": {"task": "sudoku", "params": {"base": 2}, "batch": 8, "threshold": 0.125,
               "candidates": ["scalar_l1_trainable", "scalar_l2_trainable", "scalar_l3_trainable", "read_twice"]},
    },
}
A, B, C, RT = "scalar_l1_trainable", "scalar_l2_trainable", "scalar_l3_trainable", "read_twice"


def make_spec(mutate: Callable[[dict], None] | None = None):
    data = copy.deepcopy(BASE)
    if mutate:
        mutate(data)
    return parse_spec(data)


def record_for(unit: RunUnit, records: list, status: str = "ok", value: float | None = 0.5,
               error_kind: str | None = None, error_message: str | None = None) -> Record:
    """The record a scheduler would write for `unit` (the comparison fields from planner.judge)."""
    if status != "ok":
        value = None
    j = judge(unit, status, value, records)
    return Record(round=unit.round, task=unit.task, task_kind=unit.task_kind, stage=unit.stage,
                  candidate=unit.candidate.name, mode=unit.candidate.mode, seed=unit.seed, run_key=unit.run_key,
                  attempt=0, fs=unit.candidate.fs.model_dump() if unit.candidate.fs else None,
                  batch_size=unit.batch_size, micro_batch=unit.batch_size, grad_accum=1, steps=unit.steps,
                  budget_steps=unit.steps, eval_every=unit.eval_every, n_val=unit.n_val, data_seed=unit.data_seed,
                  status=status, error_kind=error_kind, error_message=error_message, metric="hole_acc", value=value,
                  baseline_key=j.baseline_key, baseline_value=j.baseline_value, delta=j.delta,
                  threshold=j.threshold, decision=j.decision, run_dir="/x", finished_at=utc_now())


Outcome = tuple  # (status, value) or (status, value, error_kind, error_message)


def simulate(spec, outcome: Callable[[RunUnit], Outcome], records: list | None = None, batch_sizes=None,
             max_runs: int = 500):
    """A serial scheduler: plan, run the first unit, record it, repeat. Checks no unit is ever returned twice."""
    records = list(records or [])
    order: list[RunUnit] = []
    done = {r.run_key for r in records}
    for _ in range(max_runs):
        p = plan(spec, records, batch_sizes)
        keys = [u.run_key for u in p.runnable]
        assert len(keys) == len(set(keys)), "a unit listed twice in one plan"
        assert not done & set(keys), "a recorded run was returned again"
        if not p.runnable:
            return records, order, p
        unit = p.runnable[0]
        o = outcome(unit)
        records.append(record_for(unit, records, *o))
        done.add(unit.run_key)
        order.append(unit)
    raise AssertionError("the round did not finish")


def values(table: dict[str, float], default: float = 0.25) -> Callable[[RunUnit], Outcome]:
    """Outcome function: value by candidate name (the same for every stage and seed)."""
    return lambda u: ("ok", table.get(u.candidate.name, default))


# ---------------------------------------------------------------------------------------------------------------
def test_fresh_plan_starts_with_the_quick_baselines_only():
    spec = make_spec(lambda d: d["stages"]["quick"].update(seeds=[1, 0]))
    p = plan(spec, [])
    assert [(u.candidate.name, u.stage, u.seed) for u in p.runnable] == [("baseline", "quick", 0),
                                                                        ("baseline", "quick", 1)]
    assert p.task_state == {"su": "quick"} and not p.finished and p.decisions == []


def test_candidates_follow_their_baseline_in_spec_order_seeds_ascending():
    spec = make_spec(lambda d: d["stages"]["quick"].update(seeds=[0, 1]))
    recs: list = []
    base0 = plan(spec, recs).runnable[0]
    recs.append(record_for(base0, recs))
    # baseline seed 1 still missing: no candidate starts (a failed baseline would fail the task)
    got = [(u.candidate.name, u.seed) for u in plan(spec, recs).runnable]
    assert got == [("baseline", 1)]
    base1 = plan(spec, recs).runnable[0]
    recs.append(record_for(base1, recs))
    got = [(u.candidate.name, u.seed) for u in plan(spec, recs).runnable]
    assert got == [(A, 0), (B, 0), (C, 0), (RT, 0)]  # a candidate's seeds one after another (a failure skips the rest)
    recs.append(record_for(plan(spec, recs).runnable[0], recs))
    got = [(u.candidate.name, u.seed) for u in plan(spec, recs).runnable]
    assert got == [(A, 1), (B, 0), (C, 0), (RT, 0)]


def test_full_round_order_matched_baselines_and_no_unit_twice():
    spec = make_spec(lambda d: d["tasks"].update(kv={**d["tasks"]["su"], "task": "kv_retrieval", "params": {}}))
    recs, order, p = simulate(spec, values({A: 0.5, B: 0.375, C: 0.25, RT: 0.375, "baseline": 0.25}))
    assert p.finished and p.runnable == []
    # task by task in spec order; within a stage the baseline first
    tasks_in_order = [u.task for u in order]
    assert tasks_in_order == sorted(tasks_in_order, key=["su", "kv"].index)
    by_key = {r.run_key: r for r in recs}
    for r in recs:
        if r.candidate == "baseline":
            assert r.baseline_key is None and r.decision == "baseline"
            continue
        b = by_key[r.baseline_key]
        assert b.candidate == "baseline"
        for f in ("task", "stage", "seed", "batch_size", "budget_steps", "eval_every", "n_val", "data_seed"):
            assert getattr(b, f) == getattr(r, f), f
    # never a quick baseline for a med candidate
    med = [r for r in recs if r.stage == "med" and r.candidate != "baseline"]
    assert med and all(by_key[r.baseline_key].stage == "med" for r in med)
    quick_base = {r.run_key for r in recs if r.stage == "quick" and r.candidate == "baseline"}
    assert not quick_base & {r.baseline_key for r in med}
    for label in ("su", "kv"):
        stage_seq = [u.stage for u in order if u.task == label]
        assert stage_seq == sorted(stage_seq, key=["quick", "med", "seedcheck"].index)


def test_promotion_at_the_threshold_and_pruning_just_below():
    # threshold 0.125 (exact in binary): delta == threshold promotes, and so does float noise just below it
    # (THRESHOLD_TOLERANCE); a delta 1e-6 below prunes
    below = 0.375 - 1e-6
    noise = math.nextafter(0.375, 0.0)
    assert meets_threshold(noise - 0.25, 0.125) and not meets_threshold(below - 0.25, 0.125)
    recs, _, p = simulate(make_spec(), values({"baseline": 0.25, A: 0.375, B: below, C: 0.125, RT: 1.0}))
    quick = {d.candidate: d for d in p.decisions if d.stage == "quick"}
    assert quick[A].decision == "promote" and quick[A].mean_delta == 0.125
    assert quick[B].decision == "prune" and quick[B].mean_delta < 0.125
    assert quick[C].decision == "prune" and quick[RT].decision == "promote"
    state = p.tasks["su"].candidates
    assert state[B].status == "pruned" and "quick delta" in state[B].reason and state[B].reached == "quick"
    med_runs = {r.candidate for r in recs if r.stage == "med"}
    assert med_runs == {"baseline", A, RT}
    # the per-run decision of a one-seed gate stage agrees with the stage decision
    per_run = {r.candidate: r.decision for r in recs if r.stage == "quick"}
    assert per_run == {"baseline": "baseline", A: "promote", B: "prune", C: "prune", RT: "promote"}


def test_stage_must_complete_before_any_promotion():
    spec = make_spec()
    recs: list = []
    for _ in range(3):  # baseline, A, B of quick; C and read_twice still missing
        u = plan(spec, recs).runnable[0]
        recs.append(record_for(u, recs, "ok", 0.9 if u.candidate.name == A else 0.25))
    p = plan(spec, recs)
    assert {u.stage for u in p.runnable} == {"quick"}
    assert [u.candidate.name for u in p.runnable] == [C, RT]
    assert p.decisions == [] and p.tasks["su"].stage == "quick"
    assert p.tasks["su"].candidates[A].status == "active"


@pytest.mark.parametrize("status", ["failed", "diverged"])
def test_failed_or_diverged_baseline_fails_its_task_and_the_round_goes_on(status):
    spec = make_spec(lambda d: d["tasks"].update(kv={**d["tasks"]["su"], "task": "kv_retrieval", "params": {}}))

    def outcome(u):
        if u.task == "su" and u.is_baseline and u.stage == "med":
            return (status, None, "crash" if status == "failed" else None, "boom" if status == "failed" else None)
        return ("ok", 0.5 if u.candidate.name == A else 0.25)

    recs, _, p = simulate(spec, outcome)
    su, kv = p.tasks["su"], p.tasks["kv"]
    assert su.status == "failed" and str(su).startswith("failed: baseline failed at med seed 0")
    assert ("boom" in su.reason) if status == "failed" else ("diverged" in su.reason)
    assert not any(r.task == "su" and r.stage == "med" and r.candidate != "baseline" for r in recs)
    assert su.candidates[A].status == "stopped"
    assert kv.status == "done" and p.finished
    assert [s.state for s in p.stages if s.task == "su"] == ["complete", "failed", "skipped"]


def test_failed_and_diverged_candidates_are_pruned_with_the_error_as_reason():
    def outcome(u):
        if u.candidate.name == A:
            return ("failed", None, "crash", "segfault in kernel")
        if u.candidate.name == B:
            return ("diverged", None)
        return ("ok", 0.5 if u.candidate.name == C else 0.25)

    recs, _, p = simulate(make_spec(), outcome)
    st = p.tasks["su"].candidates
    assert st[A].status == "pruned" and "segfault in kernel" in st[A].reason
    assert st[B].status == "pruned" and "diverged" in st[B].reason
    assert {r.candidate: r.decision for r in recs if r.stage == "quick"}[A] == "failed"
    assert {r.candidate: r.decision for r in recs if r.stage == "quick"}[B] == "diverged"
    assert st[C].status == "finalist"


def test_failed_candidate_skips_its_remaining_seeds_in_a_gate_stage():
    spec = make_spec(lambda d: d["stages"]["quick"].update(seeds=[0, 1, 2]))

    def outcome(u):
        if u.candidate.name == A and u.seed == 0:
            return ("failed", None, "crash", "x")
        return ("ok", 0.25)

    recs, _, p = simulate(spec, outcome)
    assert [r.seed for r in recs if r.candidate == A] == [0]
    assert p.tasks["su"].candidates[A].status == "pruned"


def test_ok_record_without_a_value_counts_as_failed():
    spec = make_spec()
    recs: list = []
    base = plan(spec, recs).runnable[0]
    r = record_for(base, recs)
    recs.append(r.model_copy(update={"value": None}))
    p = plan(spec, recs)
    assert p.tasks["su"].status == "failed" and "no value for metric" in p.tasks["su"].reason


def test_multi_seed_gate_uses_the_mean_paired_delta():
    spec = make_spec(lambda d: d["stages"]["quick"].update(seeds=[0, 1]))
    # A: +0.25 on seed 0, -0.0625 on seed 1 -> mean +0.09375 < 0.125: pruned although seed 0 alone would pass
    # B: +0.125 and +0.125 -> promoted
    table = {("baseline", 0): 0.25, ("baseline", 1): 0.5, (A, 0): 0.5, (A, 1): 0.4375, (B, 0): 0.375, (B, 1): 0.625}
    recs, _, p = simulate(spec, lambda u: ("ok", table.get((u.candidate.name, u.seed), 0.0)))
    quick = {d.candidate: d for d in p.decisions if d.stage == "quick"}
    assert quick[A].deltas == {0: 0.25, 1: -0.0625} and quick[A].decision == "prune"
    assert quick[B].mean_delta == 0.125 and quick[B].decision == "promote"
    assert {r.decision for r in recs if r.stage == "quick" and r.candidate != "baseline"} == {"recorded"}


def test_seedcheck_pairs_every_finalist_seed_with_the_baseline_of_that_seed():
    table = {"baseline": 0.25, A: 0.5, B: 0.75, C: 0.625, RT: 0.25}
    recs, _, p = simulate(make_spec(), values(table))
    su = p.tasks["su"]
    # finalists: med survivors best first, at most max_finalists (2)
    assert su.finalists == [B, C] and su.status == "done" and su.reason == f"finalists: {B}, {C}"
    assert su.candidates[A].status == "pruned" and "max_finalists" in su.candidates[A].reason
    by_key = {r.run_key: r for r in recs}
    sc = [r for r in recs if r.stage == "seedcheck"]
    assert sorted({(r.candidate, r.seed) for r in sc}) == sorted(
        [(c, s) for c in ("baseline", B, C) for s in range(5)])
    for r in sc:
        if r.candidate != "baseline":
            b = by_key[r.baseline_key]
            assert (b.stage, b.seed, b.candidate) == ("seedcheck", r.seed, "baseline")
            assert r.decision == "recorded" and r.delta == table[r.candidate] - 0.25
    assert len({r.baseline_key for r in sc if r.candidate != "baseline"}) == 5


def test_long_runs_the_med_survivor_with_the_highest_med_delta():
    def add_long(d):
        d["stages"]["long"] = {"steps": 40, "eval_every": 10, "seeds": [0]}

    # quick values equal for all; med: C best
    def outcome(u):
        if u.stage == "med":
            return ("ok", {"baseline": 0.25, A: 0.5, B: 0.375, C: 0.75, RT: 0.25}[u.candidate.name])
        return ("ok", 0.25 if u.is_baseline else 0.5)

    recs, order, p = simulate(make_spec(add_long), outcome)
    long_runs = [(r.candidate, r.seed) for r in recs if r.stage == "long"]
    assert long_runs == [("baseline", 0), (C, 0)]
    assert p.tasks["su"].long_pick == C
    stages = [u.stage for u in order]
    assert stages.index("long") > max(i for i, s in enumerate(stages) if s == "med")
    assert stages.index("seedcheck") > max(i for i, s in enumerate(stages) if s == "long")
    long_rec = next(r for r in recs if r.stage == "long" and r.candidate == C)
    assert long_rec.decision == "recorded" and long_rec.baseline_key.startswith("su.long.baseline.s0-")


def test_no_survivors_ends_the_task_and_skips_later_stages():
    recs, _, p = simulate(make_spec(), values({"baseline": 0.5}, default=0.25))
    su = p.tasks["su"]
    assert su.status == "done" and "no candidate passed quick" in su.reason
    assert {r.stage for r in recs} == {"quick"}
    assert [(s.stage, s.state) for s in p.stages] == [("quick", "complete"), ("med", "skipped"),
                                                      ("seedcheck", "skipped")]


def test_stage_table_counts():
    spec = make_spec()
    recs: list = []
    for outcome in [("ok", 0.25), ("ok", 0.5), ("failed", None, "crash", "x")]:
        u = plan(spec, recs).runnable[0]
        recs.append(record_for(u, recs, *outcome))
    rows = stage_table(spec, recs)
    q = rows[0]
    assert (q.stage, q.state, q.total, q.done, q.failed) == ("quick", "running", 5, 3, 1)
    assert [(r.stage, r.state, r.total) for r in rows[1:]] == [("med", "waiting", None), ("seedcheck", "waiting", None)]
    recs2, _, p = simulate(spec, values({"baseline": 0.25, A: 0.5}, default=0.25))
    q = p.stages[0]
    assert (q.total, q.done, q.promoted, q.pruned) == (5, 5, 1, 3)


def test_batch_auto_waits_for_the_probe_and_the_batch_enters_the_key():
    spec = make_spec(lambda d: d["tasks"]["su"].update(batch="auto"))
    p = plan(spec, [])
    assert p.needs_probe == ["su"] and p.runnable == [] and not p.finished and p.task_state["su"] == "needs batch probe"
    p4, p8 = plan(spec, [], {"su": 4}), plan(spec, [], {"su": 8})
    assert p4.runnable[0].batch_size == 4 and p4.runnable[0].run_key != p8.runnable[0].run_key


def test_records_of_a_changed_spec_are_not_reused():
    spec = make_spec()
    recs, _, _ = simulate(spec, values({"baseline": 0.25, A: 0.5}))
    longer = make_spec(lambda d: d["stages"]["med"].update(steps=30))
    p = plan(longer, recs)
    # quick is unchanged and complete; every med run is new (the old med runs had 20 steps)
    assert {u.stage for u in p.runnable} == {"med"}
    old_med = {r.run_key for r in recs if r.stage != "quick"}
    assert old_med and old_med <= set(p.unused_records)
    assert not {u.run_key for u in p.runnable} & old_med
    # a changed candidate configuration is a different run, with a different key
    other = make_spec(lambda d: d["tasks"]["su"].update(candidates=[{"name": A, "fs": {"alpha_init": -1.0}}, B, C, RT]))
    assert plan(other, recs).unused_records


def test_plan_is_pure_and_deterministic():
    spec = make_spec()
    recs, _, _ = simulate(spec, values({"baseline": 0.25, A: 0.5, B: 0.5}))
    snapshot = [r.model_dump() for r in recs]
    p1, p2 = plan(spec, recs), plan(spec, list(recs))
    assert [r.model_dump() for r in recs] == snapshot
    assert p1.decisions == p2.decisions and p1.task_state == p2.task_state and p1.stages == p2.stages
    assert plan(spec, [r.model_dump() for r in recs]).decisions == p1.decisions  # dicts work as records too


def test_duplicate_records_are_reported():
    spec = make_spec()
    u = plan(spec, []).runnable[0]
    r = record_for(u, [])
    p = plan(spec, [r, r])
    assert p.warnings and u.run_key in p.warnings[0]


def test_run_config_carries_the_unit_and_the_spec_defaults():
    spec = make_spec(lambda d: d.update(defaults={"lr": {"model": 3e-5}, "n_test": 16, "device": "cpu"}))
    u = plan(spec, []).runnable[0]
    cfg = u.run_config(run_dir="/r/a0", attempt=2, micro_batch=4, fault="crash")
    assert isinstance(cfg, RunConfig)
    assert (cfg.run_key, cfg.task, cfg.task_kind, cfg.stage, cfg.seed, cfg.steps, cfg.eval_every) == (
        u.run_key, "su", "sudoku", "quick", 0, 10, 5)
    assert (cfg.batch_size, cfg.micro_batch, cfg.grad_accum, cfg.attempt, cfg.fault) == (8, 4, 2, 2, "crash")
    assert (cfg.lr.model, cfg.n_test, cfg.device, cfg.mode, cfg.fs) == (3e-5, 16, "cpu", "baseline", None)
    assert u.run_config(run_dir="/r", device="cuda").device == "cuda"
    recs = [record_for(u, [])]
    cand = plan(spec, recs).runnable[0]
    c = cand.run_config(run_dir="/r")
    assert c.mode == "prompt_fs" and c.fs == cand.candidate.fs and c.fs.layer_start == 1
    assert cand.retries == spec.defaults.retries and u.retries == spec.defaults.baseline_retries


def test_unit_value_from_result_metrics():
    spec = make_spec(lambda d: d["tasks"]["su"].update(metric="solve_rate"))
    u = plan(spec, []).runnable[0]
    assert u.metric_name("hole_acc") == "solve_rate"
    assert u.value_from({"val_solve_rate": 0.5, "val_hole_acc": 0.9}, "hole_acc") == 0.5
    assert u.value_from({"val_solve_rate": float("nan")}, "hole_acc") is None
    u2 = plan(make_spec(), []).runnable[0]
    assert u2.value_from({"val_hole_acc": 0.75}, "hole_acc") == 0.75


def test_judge():
    spec = make_spec(lambda d: d["stages"]["med"].update(seeds=[0, 1]))
    recs, _, _ = simulate(spec, values({"baseline": 0.25, A: 0.5}))
    q_unit = next(u for u in _all_units(spec, recs) if u.stage == "quick" and u.candidate.name == A)
    j = judge(q_unit, "ok", 0.3125, recs)
    assert (j.decision, j.delta, j.baseline_value) == ("prune", 0.0625, 0.25)
    assert judge(q_unit, "ok", 0.5, recs).decision == "promote"
    assert judge(q_unit, "failed", None, recs).decision == "failed"
    assert judge(q_unit, "diverged", None, recs).delta is None
    assert judge(q_unit, "ok", None, recs).decision == "failed"
    m_unit = next(u for u in _all_units(spec, recs) if u.stage == "med" and u.candidate.name == A)
    assert judge(m_unit, "ok", 0.5, recs).decision == "recorded"  # two med seeds: decided on the mean
    base = next(u for u in _all_units(spec, recs) if u.is_baseline)
    assert judge(base, "ok", 0.1, recs).decision == "baseline"


def _all_units(spec, recs):
    """Every unit of the stages reached, rebuilt by planning on record prefixes."""
    units = {}
    for i in range(len(recs) + 1):
        for u in plan(spec, recs[:i]).runnable:
            units[u.run_key] = u
    return list(units.values())


def test_run_key_form_and_matched_baseline():
    spec = make_spec()
    u = plan(spec, []).runnable[0]
    k = u.key
    assert isinstance(k, RunKey) and k.run_key == str(k)
    parts = parse_run_key(k.run_key)
    assert (parts["task"], parts["stage"], parts["candidate"], parts["seed"]) == ("su", "quick", "baseline", 0)
    assert all(ch.isalnum() or ch in "._-" for ch in k.run_key)
    recs = [record_for(u, [])]
    cand = plan(spec, recs).runnable[0]
    assert cand.key.matched_baseline() == k and cand.baseline_key == k.run_key
    assert plan(make_spec(), []).runnable[0].run_key == k.run_key  # deterministic across specs/processes
    with pytest.raises(ValueError):
        parse_run_key("not a key")


def test_planning_a_large_round_is_fast():
    cands = [f"scalar_l{n}_trainable" for n in (1, 2, 3)] + [f"scalar_l{n}_sched_cos" for n in (1, 2, 3)] + [
        f"scalar_l{n}_norm_node" for n in (1, 2)]

    def big(d):
        for i in range(4):
            d["tasks"][f"t{i}"] = {**d["tasks"]["su"], "candidates": cands}
        d["stages"]["quick"]["seeds"] = [0, 1, 2]

    spec = make_spec(big)
    recs, order, _ = simulate(spec, lambda u: ("ok", 0.5 if u.candidate.name.endswith("trainable") else 0.25),
                              max_runs=2000)
    t0 = time.perf_counter()
    p = plan(spec, recs)
    elapsed = time.perf_counter() - t0
    assert p.finished and len(recs) > 200
    assert elapsed < 1.0, f"plan over {len(recs)} records took {elapsed:.2f}s"


def test_a_gate_stage_runs_only_what_every_completion_order_needs():
    """With several workers, nothing starts whose need depends on a run still in flight: the candidates wait for every
    baseline (a failed one fails the task), a candidate's seeds run one after another (a failure skips the rest)."""
    spec = make_spec(lambda d: (d["stages"]["quick"].update(seeds=[0, 1, 2]),
                                d["tasks"]["su"].update(candidates=[A])))
    recs: list = []
    base0 = plan(spec, recs).runnable[0]
    recs.append(record_for(base0, recs))
    assert [(u.candidate.name, u.seed) for u in plan(spec, recs).runnable] == [("baseline", 1), ("baseline", 2)]
    recs += [record_for(u, recs) for u in plan(spec, recs).runnable]
    (cand0,) = plan(spec, recs).runnable
    assert (cand0.candidate.name, cand0.seed) == (A, 0)
    recs.append(record_for(cand0, recs, "failed", None, "crash", "x"))
    p = plan(spec, recs)
    assert p.runnable == [] and p.finished
    assert p.tasks["su"].status == "done" and "no candidate passed quick" in p.tasks["su"].reason


# --- comparison rounds (seedcheck only) and model identity -------------------------------------------------------
def comparison_spec(mutate: Callable[[dict], None] | None = None):
    def only_seedcheck(d):
        d["stages"] = {"seedcheck": {"steps": 20, "eval_every": 10, "seeds": [0, 1, 2, 3, 4], "max_finalists": 4}}
        if mutate:
            mutate(d)

    return make_spec(only_seedcheck)


def test_a_comparison_round_runs_every_candidate_on_every_seed_and_prunes_nothing():
    spec = comparison_spec()
    # values that a quick gate with threshold 0.125 would prune (A, RT) or keep (B, C): here all of them run
    table = {"baseline": 0.5, A: 0.25, B: 0.75, C: 0.625, RT: 0.5}
    recs, order, p = simulate(spec, values(table))
    assert p.finished and len(recs) == 5 * 5
    assert [(u.candidate.name, u.seed) for u in order] == [(c, s) for c in ("baseline", A, B, C, RT) for s in range(5)]
    su = p.tasks["su"]
    assert su.finalists == [A, B, C, RT]  # spec order, not ranked: there is no gate delta to rank by
    assert su.status == "done" and su.reason == f"finalists: {A}, {B}, {C}, {RT}"
    assert {c.status for c in su.candidates.values()} == {"finalist"}
    assert {c.reached for c in su.candidates.values()} == {"seedcheck"}
    assert [(d.candidate, d.decision, d.mean_delta) for d in p.decisions] == [
        (A, "recorded", -0.25), (B, "recorded", 0.25), (C, "recorded", 0.125), (RT, "recorded", 0.0)]
    assert {r.decision for r in recs if r.candidate != "baseline"} == {"recorded"}
    assert [(s.stage, s.state, s.total, s.done, s.pruned) for s in p.stages] == [("seedcheck", "complete", 25, 25, 0)]
    by_key = {r.run_key: r for r in recs}
    for r in recs:
        if r.candidate != "baseline":
            assert (by_key[r.baseline_key].seed, by_key[r.baseline_key].stage) == (r.seed, "seedcheck")


def test_a_comparison_round_keeps_going_after_a_failed_candidate_run():
    spec = comparison_spec()

    def outcome(u):
        if u.candidate.name == A and u.seed == 1:
            return ("failed", None, "crash", "boom")
        return ("ok", 0.5)

    recs, _, p = simulate(spec, outcome)
    assert p.finished and len(recs) == 25  # A's other seeds still run: a seed check is never cut short
    d = next(d for d in p.decisions if d.candidate == A)
    assert d.decision == "recorded" and d.deltas[1] is None and "seed 1: failed (crash): boom" in d.reason
    # a failed baseline fails the task, as in any stage
    recs, _, p = simulate(spec, lambda u: ("failed", None, "oom", "x") if u.is_baseline and u.seed == 2 else ("ok", .5))
    assert p.tasks["su"].status == "failed" and "baseline failed at seedcheck seed 2" in p.tasks["su"].reason


def test_the_model_shape_and_a_task_model_are_part_of_the_run_identity():
    def on_cpu(d):
        d["defaults"] = {"device": "cpu"}

    plain = plan(make_spec(), []).runnable[0]
    # without a shape the setup digest is what it was before shapes existed (recorded rounds resume): on a CPU spec,
    # where the default step is the eager one it always was
    d = make_spec().defaults
    setup = short_hash({"task_kind": "sudoku", "task_params": {"base": 2},
                        "model": {"preset": "tiny", "checkpoint": None},  # the init follows the seed
                        "lr": d.lr.model_dump(mode="json"), "loss": d.loss, "n_test": d.n_test,
                        "eval_batch": d.eval_batch, "kernel": d.kernel, "precision": d.precision,
                        "cpu_threads": d.cpu_threads})
    assert plan(make_spec(on_cpu), []).runnable[0].key.setup == setup
    shaped = plan(make_spec(lambda d: d.update(model={"preset": "tiny", "shape": {"n_layer": 5}})), []).runnable[0]
    wider = plan(make_spec(lambda d: d.update(model={"preset": "tiny", "shape": {"n_embd": 128}})), []).runnable[0]
    assert len({plain.run_key, shaped.run_key, wider.run_key}) == 3
    assert shaped.model.shape.n_layer == 5 and shaped.run_config("/x").model.build_config().n_layer == 5
    # an explicitly empty shape is no shape: the same run
    assert plan(make_spec(lambda d: d.update(model={"preset": "tiny", "shape": {}})), []).runnable[0].run_key == \
        plain.run_key
    # a task's own model: its runs (baselines too) use it; the other tasks keep the round's
    spec = make_spec(lambda d: d["tasks"].update(deep={**d["tasks"]["su"], "model": {"preset": "tiny",
                                                                                       "shape": {"n_layer": 5}}}))
    units = {u.task: u for u in plan(spec, []).runnable}
    assert units["su"].run_key == plain.run_key and units["su"].model == spec.model
    assert units["deep"].model.shape.n_layer == 5 and units["deep"].key.setup == shaped.key.setup


def test_compile_is_part_of_the_run_identity_and_reaches_the_worker():
    import yaml

    from orchestrator.spec import parse_spec_text

    def with_defaults(**kw):
        return plan(make_spec(lambda d: d.setdefault("defaults", {}).update(**kw)), []).runnable

    plain = plan(make_spec(), []).runnable
    compiled = with_defaults(compile=True)
    assert {u.run_key for u in plain}.isdisjoint(u.run_key for u in compiled)
    assert all(u.run_config("/x").compile == "on" for u in compiled)
    # baselines and candidates share it: a compiled candidate is compared with a compiled baseline
    assert all(u.baseline_key in {v.run_key for v in compiled} for u in compiled if not u.is_baseline)
    # YAML's on/off read as the modes "on"/"off"
    text = yaml.safe_dump(BASE) + "defaults:\n  compile: on\n"
    assert parse_spec_text(text).defaults.compile == "on"
    # "auto" (the default) is eager on a CPU spec, with the key an explicit "off" has (and had before the setting
    # had more than two values); on a GPU spec it means graph replays, a step with its own numbers and keys
    assert plain[0].run_config("/x").compile == "auto"
    cpu_auto = with_defaults(device="cpu")
    assert {u.run_key for u in cpu_auto} == {u.run_key for u in with_defaults(device="cpu", compile=False)}
    gpu_auto, gpu_off, gpu_graphs = (with_defaults(device="cuda", compile=c) for c in ("auto", "off", "graphs"))
    plain_keys, auto_keys, off_keys, graphs_keys = ({u.run_key for u in units}
                                                    for units in (cpu_auto, gpu_auto, gpu_off, gpu_graphs))
    assert off_keys == plain_keys  # the device is not part of a run's identity; an eager step is one step
    assert auto_keys.isdisjoint(plain_keys) and graphs_keys.isdisjoint(plain_keys) and auto_keys.isdisjoint(graphs_keys)
    eager_graphs_keys = {u.run_key for u in with_defaults(device="cuda", compile="eager-graphs")}
    assert all(eager_graphs_keys.isdisjoint(k) for k in (plain_keys, auto_keys, graphs_keys))


def test_the_synthetic_table_study_plans_45_runs():
    from pathlib import Path

    from orchestrator.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "studies" / "synthetic_table.yaml")
    recs, order, p = simulate(spec, lambda u: ("ok", 0.5 if u.is_baseline else 0.625))
    assert p.finished and len(recs) == 3 * (1 + 2) * 5 == 45
    for label in spec.tasks:
        runs = [(u.candidate.name, u.seed) for u in order if u.task == label]
        assert sorted(runs) == sorted((c, s) for c in ("baseline", "scalar_l1_nodetach", "read_twice")
                                      for s in range(5))
        assert p.tasks[label].finalists == ["scalar_l1_nodetach", "read_twice"]
    shapes = {(c.n_layer, c.n_embd, c.head_size) for c in (u.model.build_config() for u in order)}
    assert shapes == {(2, 128, 32)}  # the original's L2/e128/h32, FS off and on alike
    assert len({u.steps for u in order}) == 1 and {u.device for u in order} == {"cuda"}
