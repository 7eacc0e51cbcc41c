"""Seed pairing: every candidate run is compared with the baseline of its own task, stage and seed.

The baselines here differ on every seed and stage, so pairing a run with any other baseline (seed 0's, the quick
stage's, another task's) changes a delta. Values are multiples of 1/64: sums and means are exact in binary floating
point, so the expected deltas and means are computed independently and compared exactly.
"""
from __future__ import annotations

import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.report import write_report
from tests.orchestrator.test_planner import A, B, C, RT, make_spec, simulate
from tests.orchestrator.test_report import SPEC as REPORT_SPEC, RoundBuilder

CANDIDATES = ("baseline", A, B, C, RT)
STAGE_SEEDS = {"quick": [0, 1, 2], "med": [0, 1], "seedcheck": [0, 1, 2, 3, 4]}
THRESHOLD = 0.125  # test_planner's spec


def planner_spec(max_finalists: int = 2):
    def mutate(d):
        for stage, seeds in STAGE_SEEDS.items():
            d["stages"][stage]["seeds"] = seeds
        d["stages"]["seedcheck"]["max_finalists"] = max_finalists
    return make_spec(mutate)


def sixty_fourths():
    return st.integers(0, 64).map(lambda k: k / 64)


def value_tables():
    """A value for every (stage, candidate, seed) of the round."""
    keys = [(stage, cand, seed) for stage, seeds in STAGE_SEEDS.items() for cand in CANDIDATES for seed in seeds]
    return st.lists(sixty_fourths(), min_size=len(keys), max_size=len(keys)).map(lambda v: dict(zip(keys, v)))


def check_planner_pairs(table: dict) -> None:
    recs, _, p = simulate(planner_spec(), lambda u: ("ok", table[(u.stage, u.candidate.name, u.seed)]))
    assert p.finished
    by_key = {r.run_key: r for r in recs}
    for r in recs:
        if r.candidate == "baseline":
            continue
        base = by_key[r.baseline_key]
        assert (base.candidate, base.task, base.stage, base.seed) == ("baseline", r.task, r.stage, r.seed)
        assert r.baseline_value == table[(r.stage, "baseline", r.seed)]
        assert r.delta == table[(r.stage, r.candidate, r.seed)] - table[(r.stage, "baseline", r.seed)], r.run_key
    for d in p.decisions:
        expected = {s: table[(d.stage, d.candidate, s)] - table[(d.stage, "baseline", s)] for s in STAGE_SEEDS[d.stage]}
        assert d.deltas == expected, (d.stage, d.candidate)
        mean = sum(expected.values()) / len(expected)
        assert d.mean_delta == mean
        if d.stage == "seedcheck":
            assert d.decision == "recorded"
        else:
            # the screen may prune more than the threshold asks (the decision rules' halving), never promote less
            assert d.decision == "prune" or mean >= THRESHOLD, (d.stage, d.candidate, mean)
    # a candidate reaches med exactly when its mean quick delta passed, the seed check when its med delta did
    quick = {d.candidate: d for d in p.decisions if d.stage == "quick"}
    med = {d.candidate: d for d in p.decisions if d.stage == "med"}
    assert set(med) == {c for c, d in quick.items() if d.decision == "promote"}
    finalists = {d.candidate for d in p.decisions if d.stage == "seedcheck"}
    assert finalists <= {c for c, d in med.items() if d.decision == "promote"}  # which of them: the finalist rule


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value_tables())
def test_planner_deltas_and_promotions_use_the_same_seeds_baseline(table):
    check_planner_pairs(table)


def test_planner_pairing_on_a_round_where_every_candidate_reaches_the_seed_check():
    """A fixed example with every candidate promoted twice, so each seed check seed is paired for two finalists."""
    table = {(stage, cand, seed): (8 + 3 * seed + {"quick": 0, "med": 1, "seedcheck": 2}[stage]) / 64
             + (0 if cand == "baseline" else (10 + CANDIDATES.index(cand) + seed) / 64)
             for stage, seeds in STAGE_SEEDS.items() for cand in CANDIDATES for seed in seeds}
    check_planner_pairs(table)
    recs, _, p = simulate(planner_spec(), lambda u: ("ok", table[(u.stage, u.candidate.name, u.seed)]))
    sc = [r for r in recs if r.stage == "seedcheck" and r.candidate != "baseline"]
    finalists = {r.candidate for r in sc}
    assert len(finalists) >= 2 and len(sc) == 5 * len(finalists) and len({r.baseline_key for r in sc}) == 5


# --- the report ------------------------------------------------------------------------------------------------------
REPORT_CANDIDATES = {"sudoku4": ["scalar_l2_trainable", "scalar_l1_sched_cos", "head_l2", "read_twice"],
                     "kv_last": ["scalar_l2_trainable", "scalar_l1_sched_cos", "read_twice"]}
REPORT_STAGES = {"quick": [0], "med": [0], "seedcheck": [0, 1, 2, 3, 4]}


@st.composite
def report_tables(draw):
    """Baselines anywhere in [0, 40/64]; screening candidates 1..20/64 above their baseline (above both tasks'
    thresholds, so every task reaches the seed check with two finalists); seed-check candidates anywhere."""
    table = {}
    for task, cands in REPORT_CANDIDATES.items():
        for stage, seeds in REPORT_STAGES.items():
            for seed in seeds:
                base = draw(st.integers(0, 40))
                table[(task, stage, "baseline", seed)] = base / 64
                for cand in cands:
                    k = draw(st.integers(base + 1, base + 20) if stage != "seedcheck" else st.integers(0, 64))
                    table[(task, stage, cand, seed)] = k / 64
    return table


def seedcheck_tables(text: str) -> dict[tuple[str, str], list[tuple[int, float, float]]]:
    """summary.txt's seed-check tables: (task, candidate) -> [(seed, baseline %, candidate %)]."""
    out: dict = {}
    task = cand = None
    for line in text.splitlines():
        if m := re.fullmatch(r"\[(\w+)\]", line):
            task = m.group(1)
        elif m := re.fullmatch(r"  seedcheck (\w+):", line):
            cand = m.group(1)
            out[(task, cand)] = []
        elif m := re.match(r"    seed=(\d+): baseline=([\d.]+)% fs=([\d.]+)%", line):
            out[(task, cand)].append((int(m.group(1)), float(m.group(2)), float(m.group(3))))
    return out


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(report_tables())
def test_report_pairs_each_seed_with_its_own_baseline(tmp_path_factory, table):
    rb = RoundBuilder(tmp_path_factory.mktemp("round"), REPORT_SPEC)
    rb.run_all(lambda task, stage, cand, seed: table[(task, stage, cand, seed)])
    write_report(rb.dir)
    summary = json.loads((rb.dir / "report" / "summary.json").read_text())
    assert summary["problems"] == []
    for task, t in summary["tasks"].items():
        for stage, s in t["stages"].items():
            for cand, c in s["candidates"].items():
                assert sorted(c["seeds"]) == [f"s{seed}" for seed in REPORT_STAGES[stage]], (task, stage, cand)
                for key, row in c["seeds"].items():
                    seed = row["seed"]
                    assert key == f"s{seed}"
                    assert row["baseline_value"] == table[(task, stage, "baseline", seed)]
                    assert row["delta"] == table[(task, stage, cand, seed)] - table[(task, stage, "baseline", seed)]
        finalists = t["seedcheck"]["finalists"]
        for cand, f in finalists.items():
            expected = {f"s{seed}": table[(task, "seedcheck", cand, seed)] - table[(task, "seedcheck", "baseline", seed)]
                        for seed in REPORT_STAGES["seedcheck"]}
            assert f["deltas"] == expected, (task, cand)
            assert f["mean"] == sum(expected.values()) / 5
            assert (f["wins"], f["losses"]) == (sum(d > 0 for d in expected.values()),
                                                sum(d < 0 for d in expected.values()))
    # the seed-check table of summary.txt prints each seed's own baseline next to the candidate
    tables = seedcheck_tables((rb.dir / "report" / "summary.txt").read_text())
    assert set(tables) == {(task, c) for task, t in summary["tasks"].items() for c in t["seedcheck"]["finalists"]}
    for (task, cand), rows in tables.items():
        assert {seed for seed, _, _ in rows} <= set(summary["tasks"][task]["seedcheck"]["seeds"])
        for seed, base, fs in rows:
            assert base == round(100 * table[(task, "seedcheck", "baseline", seed)], 2), (task, cand, seed)
            assert fs == round(100 * table[(task, "seedcheck", cand, seed)], 2), (task, cand, seed)
