"""Running the protocol: one replicate is one whole round, many replicates give the rates and the cost with their
Monte-Carlo standard errors.

The loop asks `planner.plan(spec, records)` for the runnable units, synthesises a record for every one of them, feeds
them back together and asks again until the plan is finished; the stage decisions (promote / prune) are the plan's
own, and the seed-check decision is `decisions.SeedCheckRule` applied to the plan's seed-check deltas exactly as the
report applies it (Holm family = every finalist of the round). Training is deterministic: two stages that run the same
training (same task, candidate, seed, steps, batch, n_val, data seed) give the same value, so a seed check that
repeats the med runs on seed 0 sees their values again, as it does on a real device.
"""
from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

from model.candidates import BASELINE
from orchestrator import planner
from orchestrator.decisions import SeedCheckRule
from orchestrator.errors import UserError
from orchestrator.runkey import RunKey
from orchestrator.simulate.memo import memoized_pure_functions
from orchestrator.simulate.model import DECISION_STAGE, SEEDCHECK_LABELS, OutcomeModel, Protocol, Scenario
from orchestrator.stats import paired_stats


@dataclass
class ReplicateOutcome:
    seedcheck: dict[tuple[str, str], str]  # (task, candidate) -> confirmed / inconclusive / rejected
    stage_decisions: list[planner.StageDecision]
    runs: int
    wall_s: float
    stage_runs: dict[str, int]
    task_wall_s: dict[str, float] = field(default_factory=dict)  # task -> the part of wall_s spent on it


class _Synthesiser:
    """Values for one replicate, drawn lazily and cached so that repeated training gives the same value."""

    def __init__(self, protocol: Protocol, model: OutcomeModel, scenario: Scenario, rng: random.Random):
        self.model, self.rng = model, rng
        self.effects: dict[tuple[str, str], float] = {}
        for label in protocol.spec.tasks:
            sigma = model.sigma(label)
            for i, c in enumerate(protocol.spec.candidates(label)):
                self.effects[(label, c.name)] = scenario.effect(i) * sigma
        self.stage_effect: dict[tuple[str, str, str], float] = {}
        self.seed_effect: dict[tuple, float] = {}
        self.values: dict[tuple, tuple[str, float | None]] = {}

    def training(self, key: RunKey, candidate: str | None = None) -> tuple:
        """What decides a run's value: everything in its key but the eval cadence (and the stage, when the same
        training repeats identically); `candidate` names another candidate (the matched baseline's training)."""
        return (key.task, candidate or key.candidate, key.seed, key.batch_size, key.steps, key.n_val, key.data_seed,
                key.setup, "" if self.model.repeats_identical else key.stage)

    def outcome(self, unit: planner.RunUnit) -> tuple[str, float | None]:
        ident = self.training(unit.key)
        if ident in self.values:
            return self.values[ident]
        m, rng = self.model, self.rng
        base_ident = self.training(unit.key, BASELINE.name)
        if base_ident not in self.seed_effect:
            self.seed_effect[base_ident] = m.baseline_level + rng.gauss(0.0, m.baseline_seed_sd)
        value: float | None = self.seed_effect[base_ident]
        status = "ok"
        if not unit.is_baseline:
            sk = (unit.task, unit.candidate.name, unit.stage)
            if sk not in self.stage_effect:
                self.stage_effect[sk] = (m.effect_scale.get(unit.stage, 1.0) * self.effects[sk[:2]]
                                         + rng.gauss(0.0, m.effect_sd.get(unit.stage, 0.0)))
            value += self.stage_effect[sk] + rng.gauss(0.0, m.sd(unit.task, unit.stage))
            if m.diverge_prob and rng.random() < m.diverge_prob:
                status, value = "diverged", None
        self.values[ident] = (status, value)
        return status, value


def seedcheck_decisions(p: planner.Plan, rule: SeedCheckRule) -> dict[tuple[str, str], str]:
    """The report's seed-check decision for every finalist of a finished plan: the sequential check's own label
    where the plan has one; for the fixed check, paired statistics over the seeds with a delta, Holm over all the
    round's fixed-check finalists, then the rule."""
    labelled = {(d.task, d.candidate): d.label for d in p.decisions if d.stage == DECISION_STAGE and d.label}
    finals = [d for d in p.decisions if d.stage == DECISION_STAGE and not d.label]
    st = [paired_stats([v for v in d.deltas.values() if v is not None], rule.confidence)
          if any(v is not None for v in d.deltas.values()) else None for d in finals]
    adjusted = rule.holm_family(st)
    return {**labelled,
            **{(d.task, d.candidate): rule.decide(s, d.threshold, q)[0] for d, s, q in zip(finals, st, adjusted)}}


def run_replicate(protocol: Protocol, model: OutcomeModel, scenario: Scenario, rng: random.Random,
                  max_rounds: int = 10_000) -> ReplicateOutcome:
    """One round: plan, run every runnable unit, feed the records back, until the plan is finished."""
    synth = _Synthesiser(protocol, model, scenario, rng)
    records: list[dict[str, Any]] = []
    wall = 0.0
    stage_runs: dict[str, int] = defaultdict(int)
    task_wall: dict[str, float] = defaultdict(float)
    for _ in range(max_rounds):
        p = planner.plan(protocol.spec, records, protocol.batch_sizes)
        if p.finished:
            return ReplicateOutcome(seedcheck_decisions(p, protocol.rule), p.decisions, len(records), wall,
                                    dict(stage_runs), dict(task_wall))
        if not p.runnable:
            raise RuntimeError(f"the planner stopped without finishing: {p.task_state}")
        for unit in p.runnable:
            status, value = synth.outcome(unit)
            # the held-out test metric is the validation value: evaluation noise is part of the paired-delta SD
            records.append({"run_key": unit.run_key, "status": status, "value": value, "metric": "m",
                            "test": {"test_m": value}})
            wall += model.wall_s.get(unit.stage, 1.0)
            task_wall[unit.task] += model.wall_s.get(unit.stage, 1.0)
            stage_runs[unit.stage] += 1
    raise RuntimeError("the planner did not finish")


@dataclass(frozen=True)
class Estimate:
    value: float | None  # None where nothing was observed (no real candidate, no confirmation)
    se: float | None  # Monte-Carlo standard error

    def as_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "se": self.se}

    def pct(self) -> str:
        if self.value is None:
            return "-"
        return f"{100 * self.value:.2f}% ± {100 * (self.se or 0.0):.2f}"

    def num(self) -> str:
        return "-" if self.value is None else f"{self.value:.3g} ± {self.se or 0.0:.2g}"


def mean_estimate(xs: Sequence[float]) -> Estimate:
    """Mean over replicates and its standard error (replicates are independent; the candidates of one replicate
    are not, so per-candidate rates are first summed within a replicate)."""
    n = len(xs)
    if n == 0:
        return Estimate(None, None)
    m = math.fsum(xs) / n
    se = statistics.stdev(xs) / math.sqrt(n) if n > 1 else None
    return Estimate(m, se)


def ratio_estimate(num: Sequence[float], den: Sequence[float]) -> Estimate:
    """sum(num) / sum(den) with its delta-method standard error over replicates."""
    n, total = len(num), math.fsum(den)
    if total == 0:
        return Estimate(None, None)
    r = math.fsum(num) / total
    resid = [a - r * b for a, b in zip(num, den)]
    return Estimate(r, math.sqrt(math.fsum(x * x for x in resid)) / total if n > 1 else None)


@dataclass
class ScenarioResult:
    protocol: str
    scenario: Scenario
    replicates: int
    n_candidates: int
    p_confirm_null: Estimate  # per null candidate
    fwer: Estimate  # P(at least one null candidate confirmed in the round)
    power: Estimate  # per real candidate (effect != 0): P(confirmed)
    false_share: Estimate  # confirmations of null candidates / all confirmations
    p_finalist_null: Estimate
    p_finalist_real: Estimate
    runs_per_candidate: Estimate
    cost_per_candidate: Estimate  # sum of wall_s over every run (baselines included) / candidates
    stage_runs: dict[str, float]  # mean runs per replicate, per stage
    decisions: dict[str, float]  # mean seed-check decisions per replicate, by label
    seconds: float  # wall-clock time of the simulation

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"protocol": self.protocol, "scenario": self.scenario.name,
                               "effects": list(self.scenario.effects), "replicates": self.replicates,
                               "n_candidates": self.n_candidates}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Estimate):
                out[f.name] = v.as_dict()
        out.update(stage_runs=self.stage_runs, decisions=self.decisions, seconds=self.seconds)
        return out


def simulate(protocol: Protocol, model: OutcomeModel, scenario: Scenario, replicates: int = 2000,
             seed: int = 0) -> ScenarioResult:
    """`replicates` independent rounds of `protocol` under `model` and `scenario`; the same seed gives the same
    result."""
    import time

    if replicates < 1:
        raise UserError(f"replicates: must be at least 1, got {replicates}")
    rng = random.Random(f"{seed}/{protocol.name}/{scenario.name}")
    positions = {(label, c.name): i for label in protocol.spec.tasks
                 for i, c in enumerate(protocol.spec.candidates(label))}
    real = {k for k, i in positions.items() if scenario.effect(i) != 0}
    n_null, n_real = len(positions) - len(real), len(real)
    null_conf, any_null, real_conf, all_conf, null_fin, real_fin, runs, cost = ([] for _ in range(8))
    stage_runs: dict[str, int] = defaultdict(int)
    labels: dict[str, int] = defaultdict(int)
    t0 = time.perf_counter()
    with memoized_pure_functions():
        for _ in range(replicates):
            out = run_replicate(protocol, model, scenario, rng)
            conf = {k for k, lab in out.seedcheck.items() if lab == "confirmed"}
            null_conf.append(len(conf - real))
            any_null.append(float(bool(conf - real)))
            real_conf.append(len(conf & real))
            all_conf.append(len(conf))
            null_fin.append(len(set(out.seedcheck) - real))
            real_fin.append(len(set(out.seedcheck) & real))
            runs.append(out.runs / len(positions))
            cost.append(out.wall_s / len(positions))
            for s, n in out.stage_runs.items():
                stage_runs[s] += n
            for lab in out.seedcheck.values():
                labels[lab] += 1
    per = lambda xs, n: mean_estimate([x / n for x in xs]) if n else Estimate(None, None)  # noqa: E731
    return ScenarioResult(
        protocol=protocol.name, scenario=scenario, replicates=replicates, n_candidates=len(positions),
        p_confirm_null=per(null_conf, n_null), fwer=mean_estimate(any_null) if n_null else Estimate(None, None),
        power=per(real_conf, n_real), false_share=ratio_estimate(null_conf, all_conf),
        p_finalist_null=per(null_fin, n_null), p_finalist_real=per(real_fin, n_real),
        runs_per_candidate=mean_estimate(runs), cost_per_candidate=mean_estimate(cost),
        stage_runs={s: n / replicates for s, n in stage_runs.items()},
        decisions={lab: labels[lab] / replicates for lab in SEEDCHECK_LABELS},
        seconds=time.perf_counter() - t0)


def compare(protocols: Sequence[Protocol], model_for: Any, scenarios: Sequence[Scenario], replicates: int,
            seed: int) -> list[ScenarioResult]:
    """Every protocol under every scenario; `model_for(protocol)` gives the outcome model of each."""
    return [simulate(p, model_for(p), s, replicates, seed) for p in protocols for s in scenarios]


def med_unit(protocol: Protocol, model: OutcomeModel) -> float:
    """Seconds of one med run (the cost unit); without a med stage, of the longest stage's run."""
    stages = dict(protocol.spec.stage_list())
    ref = "med" if "med" in stages else max(stages, key=lambda s: stages[s].steps)
    return model.wall_s.get(ref, 1.0)
