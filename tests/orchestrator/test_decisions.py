"""The decision module: the rules the planner, the report and the simulator share."""
from __future__ import annotations

import random

import pytest

from orchestrator import decisions
from orchestrator.decisions import (SCREEN_RULE, ScreenDecision, mean_delta, meets_threshold, rank_by_delta,
                                    run_decision, screen, select_finalists, stage_rank)
from orchestrator.spec import GATE_STAGES, STAGE_ORDER


def test_one_definition_of_the_stage_order():
    assert decisions.STAGE_ORDER is STAGE_ORDER and decisions.GATE_STAGES is GATE_STAGES
    assert sorted(["seedcheck", "zzz", "quick", "long", "med"], key=stage_rank) == \
        ["quick", "med", "long", "seedcheck", "zzz"]


def test_mean_delta_does_not_depend_on_the_seed_order():
    rng = random.Random(3)
    values = [rng.uniform(-1, 1) * 10 ** rng.randint(-8, 2) for _ in range(9)]
    means = {mean_delta(rng.sample(values, len(values))) for _ in range(20)}
    assert len(means) == 1 and mean_delta([]) is None


def test_threshold_within_rounding_counts_as_met():
    assert meets_threshold(0.125 - 1e-12, 0.125) and not meets_threshold(0.125 - 1e-6, 0.125)


def test_screen_prunes_a_failed_run_with_no_mean_and_waits_for_missing_seeds():
    failed = screen("quick", [0, 1], {0: 0.5, 1: None}, "seed 1: failed", 0.0)
    assert (failed.decision, failed.mean_delta, failed.reason) == ("prune", None, "quick seed 1: failed")
    pending = screen("med", [0, 1], {0: 0.5}, None, 0.0)
    assert pending.decision == "pending" and pending.mean_delta == 0.5
    assert screen("quick", [0, 1], {0: 0.1, 1: 0.3}, None, 0.2).decision == "promote"
    assert screen("quick", [0, 1], {0: 0.1, 1: 0.2}, None, 0.2).decision == "prune"
    assert screen("long", [0], {0: 0.9}, None, 0.0).decision == "recorded"
    assert screen("seedcheck", [0, 1], {0: 0.9, 1: 0.1}, None, 0.0).decision == "statistics"


def test_a_records_decision_is_the_one_seed_stage_decision():
    assert run_decision(True, "ok", "quick", 1, None, 0.0) == "baseline"
    assert run_decision(True, "diverged", "quick", 1, None, 0.0) == "diverged"
    assert run_decision(False, "failed", "quick", 1, 0.5, 0.0) == "failed"
    assert run_decision(False, "ok", "quick", 1, 0.01, 0.02) == "prune"
    assert run_decision(False, "ok", "med", 1, 0.02, 0.02) == "promote"
    assert run_decision(False, "ok", "med", 2, 0.5, 0.02) == "recorded"  # decided on the mean over seeds
    assert run_decision(False, "ok", "seedcheck", 1, 0.5, 0.02) == "recorded"


def test_finalists_best_delta_first_ties_in_spec_order_and_cut_at_the_limit():
    names = ["a", "b", "c", "d"]
    deltas = {"a": 0.1, "b": 0.3, "c": 0.1, "d": None}
    assert rank_by_delta(names, deltas) == ["b", "a", "c", "d"]
    assert select_finalists(names, deltas, 2) == ["b", "a"]


class PromoteEverything:
    def decide(self, stage, deltas, threshold):
        return ScreenDecision(stage, "promote", mean_delta(list(deltas.values())), threshold, "promoted by test")


@pytest.mark.parametrize("stage_seeds", [1, 2])
def test_a_plugged_screen_rule_reaches_stage_and_record_decisions(monkeypatch, stage_seeds):
    monkeypatch.setattr(decisions, "SCREEN_RULE", PromoteEverything())
    assert screen("quick", [0], {0: -5.0}, None, 0.0).decision == "promote"
    assert run_decision(False, "ok", "quick", 1, -5.0, 0.0) == "promote"
    monkeypatch.undo()
    assert decisions.SCREEN_RULE is SCREEN_RULE and screen("quick", [0], {0: -5.0}, None, 0.0).decision == "prune"
