"""The planner decides the same whatever order runs finish in: a round driven by a serial scheduler and by a pool of
workers (runs finishing in random order, several in flight, workers planning from a view a few records old) ends
with the same runs, the same records and the same decisions; plan() given the same records in any order, or in
arrival batches, gives the same plan."""
from __future__ import annotations

import copy
import random
from dataclasses import asdict
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.planner import RunUnit, judge, plan
from orchestrator.spec import parse_spec

CHANCE = 0.25  # sudoku base 2, hole_acc


def spec_data(n_fs: int, quick: dict, med: dict | None, seedcheck: dict, threshold: Any, control: bool) -> dict:
    cands: list[Any] = [{"name": f"c{i}", "fs": {"layer_start": 1, "alpha_init": -3.0 + 0.25 * i}}
                        for i in range(n_fs)]
    if control:
        cands.append("read_twice")
    stages: dict[str, Any] = {"quick": {"steps": 10, "eval_every": 5, **quick}}
    if med is not None:
        stages["med"] = {"steps": 20, "eval_every": 10, **med}
    stages["seedcheck"] = {"steps": 20, "eval_every": 10, **seedcheck}
    return {"round": "t", "model": {"preset": "tiny"}, "stages": stages,
            "tasks": {"su": {"task": "sudoku", "params": {"base": 2}, "batch": 8, "threshold": threshold,
                             "candidates": cands},
                      "su3": {"task": "sudoku", "params": {"base": 2, "mask_count": 3}, "batch": 8,
                              "threshold": 0.0, "candidates": copy.deepcopy(cands)}}}


@st.composite
def rounds(draw):
    """A spec (halving or the original's threshold screen, one or several seeds; sequential or fixed seed check)
    and the seed of its outcomes."""
    screen = draw(st.sampled_from(["halving", "threshold"]))
    if screen == "halving":
        rungs = draw(st.sampled_from([[1, 2], [1, 3], [2, 4]]))
        quick = {"seeds": list(range(rungs[-1])), "screen": {"rule": "halving", "keep": 0.5, "rungs": rungs}}
    else:
        quick = {"seeds": list(range(draw(st.integers(1, 3)))), "screen": {"rule": "threshold"}}
    med = draw(st.sampled_from([None, {"seeds": [0]}, {"seeds": [0, 1], "screen": {"rule": "threshold"}},
                                {"seeds": [0, 1], "screen": {"rule": "halving"}}]))
    if draw(st.booleans()):
        seedcheck = {"looks": draw(st.sampled_from([[2], [2, 3], [2, 4]])), "max_finalists": draw(st.integers(1, 2)),
                     "max_controls": 1}
    else:
        seedcheck = {"rule": "fixed", "seeds": [0, 1, 2], "allow_few_seeds": True,
                     "max_finalists": draw(st.integers(1, 2)), "max_controls": 1}
    threshold = draw(st.sampled_from([0.0, 0.02, {"sd": 0.5, "calibration_seeds": 2}]))
    if isinstance(threshold, dict) and len(quick["seeds"]) < 2:
        threshold = 0.0
    spec = parse_spec(spec_data(draw(st.integers(1, 4)), quick, med, seedcheck, threshold, draw(st.booleans())))
    return spec, draw(st.integers(0, 2 ** 32 - 1)), draw(st.sampled_from([0.0, 0.2])), draw(st.integers(0, 2 ** 32 - 1))


def outcome(u: RunUnit, seed: int, p_fail: float) -> tuple[str, float | None, float | None]:
    """A run's status, validation and test value: a function of the run alone (as a real run's are), so every
    schedule that runs it gets the same."""
    rng = random.Random(f"{seed}:{u.run_key}")
    at_chance = random.Random(f"{seed}:{u.task}:{u.stage}:{u.seed}").random() < 0.2
    effect = {"c0": 0.1, "c1": 0.0, "c2": 0.04, "read_twice": 0.06}.get(u.candidate.name, -0.05)
    value = CHANCE - rng.choice([0.0, 0.0156]) if at_chance else 0.5 + (0 if u.is_baseline else effect) + \
        rng.gauss(0, 0.05)
    if rng.random() < (p_fail / 2 if u.is_baseline else p_fail):
        return rng.choice(["failed", "diverged"]), None, None
    return "ok", value, value + rng.gauss(0, 0.01)


def record(u: RunUnit, records: list[dict], seed: int, p_fail: float) -> dict:
    """The record a scheduler writes: the run's outcome and its comparison with the matched baseline (judge)."""
    status, value, test = outcome(u, seed, p_fail)
    j = judge(u, status, value, records)
    return {"run_key": u.run_key, "status": status, "value": value, "metric": "hole_acc",
            "test": {} if test is None else {"test_hole_acc": test}, "baseline_key": j.baseline_key,
            "baseline_value": j.baseline_value, "delta": j.delta, "threshold": j.threshold, "decision": j.decision}


def serial_round(spec, seed: int, p_fail: float) -> list[dict]:
    records: list[dict] = []
    for _ in range(500):
        runnable = plan(spec, records).runnable
        if not runnable:
            return records
        records.append(record(runnable[0], records, seed, p_fail))
    raise AssertionError("the serial round did not finish")


def pool_round(spec, seed: int, p_fail: float, schedule: random.Random, workers: int, lag: int) -> list[dict]:
    """Workers claim units from plans of a view up to `lag` records old (a unit is claimed once: in flight or
    recorded units are skipped) and runs finish in random order."""
    records: list[dict] = []
    in_flight: dict[str, tuple[RunUnit, list[dict]]] = {}  # run key -> unit and the records its worker knew
    for _ in range(5000):
        claimed = set(in_flight) | {r["run_key"] for r in records}
        runnable = []
        if len(in_flight) < workers:
            view = records[:len(records) - schedule.randint(0, min(lag, len(records)))]
            runnable = [u for u in plan(spec, view).runnable if u.run_key not in claimed]
        if runnable and (not in_flight or schedule.random() < 0.5):
            u = runnable[0] if schedule.random() < 0.7 else schedule.choice(runnable)
            in_flight[u.run_key] = (u, list(view))
        elif in_flight:
            u, known = in_flight.pop(schedule.choice(sorted(in_flight)))
            records.append(record(u, known, seed, p_fail))
        elif not plan(spec, records).runnable:
            return records
    raise AssertionError("the pool round did not finish")


def decisions(p) -> list[dict]:
    return [asdict(d) for d in p.decisions]


def states(p) -> dict:
    return {label: asdict(t) for label, t in p.tasks.items()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds(), st.integers(1, 4), st.integers(0, 3))
def test_a_pool_of_workers_ends_with_the_serial_rounds_runs_and_decisions(case, workers, lag):
    spec, seed, p_fail, schedule_seed = case
    serial = serial_round(spec, seed, p_fail)
    pooled = pool_round(spec, seed, p_fail, random.Random(schedule_seed), workers, lag)
    assert sorted(r["run_key"] for r in pooled) == sorted(r["run_key"] for r in serial)
    by_key = {r["run_key"]: r for r in serial}
    for r in pooled:
        assert r == by_key[r["run_key"]]
    p_serial, p_pooled = plan(spec, serial), plan(spec, pooled)
    assert p_pooled.finished and decisions(p_pooled) == decisions(p_serial)
    assert states(p_pooled) == states(p_serial) and p_pooled.stages == p_serial.stages


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds(), st.randoms(use_true_random=False))
def test_plan_of_the_same_records_in_any_order_or_batches_is_the_same(case, rng):
    spec, seed, p_fail, _ = case
    records = serial_round(spec, seed, p_fail)
    cut = rng.randint(0, len(records))
    for known in (records, records[:cut]):
        expected = plan(spec, known)
        shuffled = list(known)
        rng.shuffle(shuffled)
        got = plan(spec, shuffled)
        assert [u.run_key for u in got.runnable] == [u.run_key for u in expected.runnable]
        assert decisions(got) == decisions(expected) and states(got) == states(expected)
        assert got.stages == expected.stages
    # the records arriving in batches of any size and order: every run an intermediate plan asks for is one the
    # serial round ran (a unit emitted too early would be a run that depends on completion order)
    keys = {r["run_key"] for r in records}
    arriving = list(records)
    rng.shuffle(arriving)
    seen: list[dict] = []
    while arriving:
        size = rng.randint(1, 4)
        seen, arriving = seen + arriving[:size], arriving[size:]
        assert {u.run_key for u in plan(spec, seen).runnable} <= keys
