"""`fsearch simulate`: the error rates and cost of a round's protocol, measured by running the real planner and the
real seed-check rule against synthetic outcomes, many times over.

    protocol = default_protocol()                     # or Protocol.from_spec(load_spec("studies/x.yaml"))
    model = OutcomeModel.uniform(protocol.spec)       # paired-delta SD 1 at every stage: effects are in SD units
    result = simulate(protocol, model, Scenario.one_real(8, 1.0), replicates=2000, seed=0)
    result.p_confirm_null, result.power, result.fwer, result.cost_per_candidate   # each an Estimate(value, se)

One replicate is one whole round. The loop asks `planner.plan(spec, records)` for the runnable units, synthesises a
record for every one of them, feeds them back together and asks again until the plan is finished; the stage
decisions (promote / prune) are the plan's own, and the seed-check decision is `decisions.SeedCheckRule` applied to the
plan's seed-check deltas exactly as the report applies it (Holm family = every finalist of the round).

Outcome model, per task: baseline value on seed s = level + b_s (b_s ~ N(0, baseline_seed_sd²), shared by the
baseline and every candidate of that seed: the pairing); candidate value = baseline value + effect at that stage +
N(0, sd_stage²). The effect at a stage is effect_scale[stage] · effect + N(0, effect_sd[stage]²), one draw per
candidate and stage (a stage that sees a shrunken or only partly related effect); the final effect is the one the
seed check sees. Scenario effects are in units of the task's seed-check paired-delta SD. Training is deterministic:
two stages that run the same training (same task, candidate, seed, steps, batch, n_val, data seed) give the same
value, so a seed check that repeats the med runs on seed 0 sees their values again, as it does on a real device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from model.candidates import BASELINE
from orchestrator import planner, stats
from orchestrator.errors import UserError
from orchestrator.runkey import RunKey
from orchestrator.spec import Spec, parse_spec
from orchestrator.decisions import SeedCheckRule
from orchestrator.stats import paired_stats

DECISION_STAGE = "seedcheck"
SEEDCHECK_LABELS = ("confirmed", "inconclusive", "rejected")


# ---------------------------------------------------------------------------------------------------------------
# what is simulated
@dataclass(frozen=True)
class Protocol:
    """A round's protocol: the spec the planner runs (stages, seeds, thresholds, candidates) and the seed-check rule."""

    name: str
    spec: Spec
    rule: SeedCheckRule = SeedCheckRule()
    batch_sizes: Mapping[str, int] = field(default_factory=dict)  # for `batch: auto` tasks (any value will do)

    @classmethod
    def from_spec(cls, spec: Spec, name: str | None = None, rule: SeedCheckRule | None = None) -> "Protocol":
        auto = {label: 1 for label, t in spec.tasks.items() if t.batch == "auto"}
        return cls(name or spec.round, spec, rule or SeedCheckRule(), auto)

    @property
    def n_candidates(self) -> int:
        return sum(len(self.spec.candidates(label)) for label in self.spec.tasks)


def protocol_spec(n_candidates: int = 8, quick_seeds: int = 1, med_seeds: int = 1, check_seeds: int = 5,
                  max_finalists: int = 3, threshold: float = 0.0, check_steps_as_med: bool = True) -> dict:
    """The data of a one-task spec with today's stage layout; `check_steps_as_med` makes the seed check repeat the
    med stage's training on the seeds both have (the default spec does)."""
    cands = [{"name": f"c{i}", "fs": {"layer_start": 1, "alpha_init": round(-3.0 + 0.25 * i, 4)}}
             for i in range(n_candidates)]
    return {
        "round": "simulated", "model": {"preset": "tiny"},
        "stages": {
            "quick": {"steps": 180, "eval_every": 180, "seeds": list(range(quick_seeds))},
            "med": {"steps": 650, "eval_every": 650, "seeds": list(range(med_seeds))},
            "seedcheck": {"steps": 650 if check_steps_as_med else 651, "eval_every": 650,
                          "seeds": list(range(check_seeds)), "max_finalists": max_finalists,
                          "allow_few_seeds": check_seeds < 5},
        },
        "tasks": {"t": {"task": "sudoku", "params": {"base": 2}, "batch": 8, "threshold": threshold,
                        "candidates": cands}},
    }


def original_protocol(n_candidates: int = 8, threshold: float = 0.0) -> Protocol:
    """The original's protocol (ports pin it): 1-seed quick, 1-seed med (threshold rule), 5-seed fixed check
    repeating the med run on seed 0, <= 3 finalists."""
    return Protocol.from_spec(parse_spec(protocol_spec(n_candidates, threshold=threshold)), name="original")


# The default protocol, chosen with this simulator (README "Protocol and statistics"): successive halving over quick
# seeds, then the sequential check on fresh seeds for the one best FS candidate.
DEFAULT_QUICK_RUNGS = (2, 6, 12)
DEFAULT_MAX_FINALISTS = 1


def search_spec(n_candidates: int = 8, rungs: Sequence[int] = DEFAULT_QUICK_RUNGS, keep: float = 0.5,
                drop_p: float = 0.1, looks: Sequence[int] | None = None, alpha: float = 0.05,
                max_finalists: int = DEFAULT_MAX_FINALISTS, threshold: float = 0.0, med_seeds: int = 0,
                med_rungs: Sequence[int] | None = None) -> dict:
    """The data of a one-task spec with the multi-seed rules: a halving quick screen over max(rungs) seeds, an
    optional med stage (`med_seeds` > 0, halving over its seeds), and the sequential seed check (spec defaults where
    `looks` is None)."""
    cands = [{"name": f"c{i}", "fs": {"layer_start": 1, "alpha_init": round(-3.0 + 0.25 * i, 4)}}
             for i in range(n_candidates)]
    stages: dict[str, Any] = {
        "quick": {"steps": 180, "eval_every": 180, "seeds": list(range(max(rungs))),
                  "screen": {"rule": "halving", "keep": keep, "rungs": list(rungs), "drop_p": drop_p}},
    }
    if med_seeds:
        stages["med"] = {"steps": 650, "eval_every": 650, "seeds": list(range(med_seeds)),
                         "screen": {"rule": "halving", "keep": keep, "rungs": list(med_rungs or [med_seeds]),
                                    "drop_p": drop_p}}
    stages["seedcheck"] = {"steps": 650, "eval_every": 650, "max_finalists": max_finalists, "alpha": alpha,
                           "rule": "sequential"}
    if looks is not None:
        stages["seedcheck"]["looks"] = list(looks)
    return {"round": "simulated", "model": {"preset": "tiny"}, "stages": stages,
            "tasks": {"t": {"task": "sudoku", "params": {"base": 2}, "batch": 8, "threshold": threshold,
                            "candidates": cands}}}


def default_protocol(n_candidates: int = 8, threshold: float = 0.0) -> Protocol:
    """The default protocol: halving over 2 -> 6 -> 12 quick seeds (keep half: 8 -> 4 -> 2 -> 1 candidates), then
    the sequential check (looks from the spec schema) on fresh seeds for the best FS candidate, deciding on the
    held-out test metric."""
    return Protocol.from_spec(parse_spec(search_spec(n_candidates, threshold=threshold)), name="default")


@dataclass(frozen=True)
class OutcomeModel:
    noise_sd: Mapping[str, float]  # stage -> SD of the paired deltas (candidate - matched baseline, same seed)
    wall_s: Mapping[str, float]  # stage -> seconds of one run
    effect_scale: Mapping[str, float] = field(default_factory=dict)  # stage -> share of the final effect (default 1)
    effect_sd: Mapping[str, float] = field(default_factory=dict)  # stage -> SD of a stage-only effect (default 0)
    task_noise_sd: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # task -> stage -> SD (override)
    baseline_level: float = 0.5
    baseline_seed_sd: float = 0.05
    diverge_prob: float = 0.0  # per candidate run
    repeats_identical: bool = True  # the same training in two stages gives the same value
    source: str = "uniform"  # how the numbers were obtained, for the printout

    @classmethod
    def uniform(cls, spec: Spec, sd: float = 1.0, quick_wall: float = 0.4, **kw: Any) -> "OutcomeModel":
        """The same paired-delta SD at every stage; wall times in med-run units (quick = `quick_wall`, others by
        steps relative to med)."""
        stages = dict(spec.stage_list())
        ref = stages["med"].steps if "med" in stages else max(st.steps for st in stages.values())
        walls = {n: (quick_wall if n == "quick" else st.steps / ref) for n, st in stages.items()}
        return cls(noise_sd={n: sd for n in stages}, wall_s=walls, **kw)

    def sd(self, task: str, stage: str) -> float:
        per_task = self.task_noise_sd.get(task, {})
        if stage in per_task:
            return per_task[stage]
        if stage in self.noise_sd:
            return self.noise_sd[stage]
        return self.noise_sd.get(DECISION_STAGE, max(self.noise_sd.values()))

    def sigma(self, task: str) -> float:
        """The unit of a scenario's effects for `task`: its seed-check paired-delta SD."""
        return self.sd(task, DECISION_STAGE)


@dataclass(frozen=True)
class Scenario:
    """True final effects per candidate position (spec order within each task), in units of the task's seed-check
    paired-delta SD; positions past the tuple have no effect."""

    name: str
    effects: tuple[float, ...] = ()

    @classmethod
    def null(cls) -> "Scenario":
        return cls("all null")

    @classmethod
    def one_real(cls, n_candidates: int, effect: float, position: int = 0) -> "Scenario":
        eff = [0.0] * n_candidates
        eff[position] = effect
        return cls(f"one at {effect:+g} SD", tuple(eff))

    def effect(self, position: int) -> float:
        return self.effects[position] if position < len(self.effects) else 0.0


# ---------------------------------------------------------------------------------------------------------------
# one replicate
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


@contextlib.contextmanager
def memoized_pure_functions() -> Iterator[None]:
    """Memoise two pure functions the planner and the rule call many times with the same arguments: a run key's
    digest (a SHA-256 of its fields; every replicate plans the same runs) and the t quantile (bisection on the
    t CDF; the seed check asks for the same few). The results are the same values, only computed once."""
    digest_attr = RunKey.__dict__["digest"]
    digests: dict[RunKey, str] = {}
    compute = digest_attr.func

    def digest(self: RunKey) -> str:
        d = digests.get(self)
        if d is None:
            d = digests[self] = compute(self)
        return d

    t_ppf = stats.t_ppf
    quantiles: dict[tuple[float, float], float] = {}

    def cached_t_ppf(p: float, df: float) -> float:
        q = quantiles.get((p, df))
        if q is None:
            q = quantiles[(p, df)] = t_ppf(p, df)
        return q

    # a planner's run unit is a function of its spec, task, candidate, stage, seed, batch and threshold
    make_unit = planner._TaskPlanner.unit
    units: dict[tuple, tuple[Any, planner.RunUnit]] = {}

    def unit(self: Any, cand: Any, stage: str, seed: int) -> planner.RunUnit:
        key = (id(self.spec), self.label, cand.name, stage, seed, self.batch, self.threshold)
        hit = units.get(key)
        if hit is None or hit[0] is not self.spec:
            hit = units[key] = (self.spec, make_unit(self, cand, stage, seed))
        return hit[1]

    hash_of = planner.short_hash
    hashes: dict[str, str] = {}

    def short_hash(obj: Any, n: int = 16) -> str:
        text = repr((obj, n))
        h = hashes.get(text)
        if h is None:
            h = hashes[text] = hash_of(obj, n)
        return h

    digest_of = planner.candidate_digest
    cand_digests: dict[tuple, str] = {}

    def candidate_digest(c: Any) -> str:
        key = (c.name, c.mode, repr(c.fs))
        h = cand_digests.get(key)
        if h is None:
            h = cand_digests[key] = digest_of(c)
        return h

    RunKey.digest = property(digest)  # type: ignore[assignment]
    stats.t_ppf = cached_t_ppf
    planner._TaskPlanner.unit = unit  # type: ignore[method-assign]
    planner.short_hash = short_hash  # type: ignore[assignment]
    planner.candidate_digest = candidate_digest  # type: ignore[assignment]
    try:
        yield
    finally:
        RunKey.digest = digest_attr  # type: ignore[assignment]
        stats.t_ppf = t_ppf
        planner._TaskPlanner.unit = make_unit  # type: ignore[method-assign]
        planner.short_hash = hash_of  # type: ignore[assignment]
        planner.candidate_digest = digest_of  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------------------------
# many replicates
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


def _mean(xs: Sequence[float]) -> Estimate:
    """Mean over replicates and its standard error (replicates are independent; the candidates of one replicate
    are not, so per-candidate rates are first summed within a replicate)."""
    n = len(xs)
    if n == 0:
        return Estimate(None, None)
    m = math.fsum(xs) / n
    se = statistics.stdev(xs) / math.sqrt(n) if n > 1 else None
    return Estimate(m, se)


def _ratio(num: Sequence[float], den: Sequence[float]) -> Estimate:
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
    per = lambda xs, n: _mean([x / n for x in xs]) if n else Estimate(None, None)  # noqa: E731
    return ScenarioResult(
        protocol=protocol.name, scenario=scenario, replicates=replicates, n_candidates=len(positions),
        p_confirm_null=per(null_conf, n_null), fwer=_mean(any_null) if n_null else Estimate(None, None),
        power=per(real_conf, n_real), false_share=_ratio(null_conf, all_conf),
        p_finalist_null=per(null_fin, n_null), p_finalist_real=per(real_fin, n_real),
        runs_per_candidate=_mean(runs), cost_per_candidate=_mean(cost),
        stage_runs={s: n / replicates for s, n in stage_runs.items()},
        decisions={lab: labels[lab] / replicates for lab in SEEDCHECK_LABELS},
        seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------------
# noise measured in a finished round
@dataclass(frozen=True)
class MeasuredNoise:
    task_sd: dict[str, dict[str, float]]  # task -> stage -> pooled SD of the paired deltas over seeds
    stage_sd: dict[str, float]  # stage -> median over tasks
    wall_s: dict[str, float]  # stage -> median wall time of an ok run
    notes: list[str]


def noise_from_round(round_dir: str | Path) -> MeasuredNoise:
    """Paired-delta SDs and wall times from a round's records.

    Per task and stage, for every candidate with at least two seeds: the sample SD of its paired deltas over the
    seeds; the stage's SD pools them (variances weighted by their degrees of freedom). A stage where every candidate
    ran one seed has no such estimate: it borrows the task's seed-check SD (the spread of single deltas across
    candidates would include their real differences). Wall time per stage: the median over the stage's ok runs."""
    from orchestrator.paths import RoundPaths
    from orchestrator.records import Ledger, LedgerError

    paths = RoundPaths(Path(round_dir))
    if not paths.records.is_file():
        raise UserError(f"--noise-from {round_dir}: no {paths.records.name} there (a finished round's folder)")
    try:
        recs = Ledger(paths.records).read()
    except LedgerError as e:
        raise UserError(f"--noise-from {round_dir}: {e}") from None
    deltas: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    walls: dict[str, list[float]] = defaultdict(list)
    for r in recs:
        if r.status != "ok":
            continue
        walls[r.stage].append(r.wall_s)
        if r.delta is not None and r.candidate != BASELINE.name:
            deltas[(r.task, r.stage, r.candidate)].append(r.delta)
    pooled: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])  # sum (n-1) s^2, sum (n-1)
    tasks_stages: set[tuple[str, str]] = set()
    for (task, stage, _), ds in deltas.items():
        tasks_stages.add((task, stage))
        if len(ds) >= 2:
            acc = pooled[(task, stage)]
            acc[0] += (len(ds) - 1) * statistics.variance(ds)
            acc[1] += len(ds) - 1
    task_sd: dict[str, dict[str, float]] = defaultdict(dict)
    notes = []
    for (task, stage), (ss, df) in sorted(pooled.items()):
        task_sd[task][stage] = math.sqrt(ss / df)
        notes.append(f"{task} {stage}: SD {task_sd[task][stage]:.4g} pooled over candidates ({df:g} df)")
    for task, stage in sorted(tasks_stages - set(pooled)):
        own = task_sd.get(task, {})
        if DECISION_STAGE in own:
            notes.append(f"{task} {stage}: one seed per candidate; SD borrowed from {task} {DECISION_STAGE}")
            own[stage] = own[DECISION_STAGE]
        else:
            notes.append(f"{task} {stage}: one seed per candidate and no seed check; no SD")
    task_sd = {t: v for t, v in task_sd.items() if v}
    if not task_sd:
        raise UserError(f"--noise-from {round_dir}: no stage with two or more paired seeds per candidate")
    stages = sorted({s for v in task_sd.values() for s in v})
    stage_sd = {s: statistics.median(v[s] for v in task_sd.values() if s in v) for s in stages}
    wall = {s: statistics.median(w) for s, w in walls.items() if w}
    return MeasuredNoise(dict(task_sd), stage_sd, wall, notes)


def model_from_noise(spec: Spec, noise: MeasuredNoise, **kw: Any) -> OutcomeModel:
    """An outcome model with the measured SDs (per task where the spec's task labels match the round's) and wall
    times (stages the round did not run: by steps relative to a stage it ran)."""
    stages = dict(spec.stage_list())
    sd = {s: noise.stage_sd.get(s, noise.stage_sd.get(DECISION_STAGE, max(noise.stage_sd.values())))
          for s in stages}
    known = {s: w for s, w in noise.wall_s.items() if s in stages}
    walls = {}
    for s, st in stages.items():
        if s in known:
            walls[s] = known[s]
        else:
            ref = next(iter(known), None) or next(iter(noise.wall_s))
            ref_steps = stages[ref].steps if ref in stages else st.steps
            walls[s] = noise.wall_s[ref] * st.steps / ref_steps
    task_sd = {t: v for t, v in noise.task_sd.items() if t in spec.tasks}
    return OutcomeModel(noise_sd=sd, wall_s=walls, task_noise_sd=task_sd, source="measured", **kw)


# ---------------------------------------------------------------------------------------------------------------
# the command
def compare(protocols: Sequence[Protocol], model_for: Any, scenarios: Sequence[Scenario], replicates: int,
            seed: int) -> list[ScenarioResult]:
    """Every protocol under every scenario; `model_for(protocol)` gives the outcome model of each."""
    return [simulate(p, model_for(p), s, replicates, seed) for p in protocols for s in scenarios]


def med_unit(protocol: Protocol, model: OutcomeModel) -> float:
    """Seconds of one med run (the cost unit); without a med stage, of the longest stage's run."""
    stages = dict(protocol.spec.stage_list())
    ref = "med" if "med" in stages else max(stages, key=lambda s: stages[s].steps)
    return model.wall_s.get(ref, 1.0)


def format_results(results: Sequence[ScenarioResult], units: Mapping[str, float]) -> str:
    head = (f"{'protocol':<14} {'scenario':<16} {'P(confirm|null)':>17} {'family-wise':>15} {'power':>15} "
            f"{'false share':>15} {'runs/cand':>11} {'med-eq/cand':>12}")
    lines = [head, "-" * len(head)]
    for r in results:
        u = units.get(r.protocol, 1.0)
        cost = Estimate(r.cost_per_candidate.value / u, (r.cost_per_candidate.se or 0.0) / u)
        lines.append(f"{r.protocol:<14} {r.scenario.name:<16} {r.p_confirm_null.pct():>17} {r.fwer.pct():>15} "
                     f"{r.power.pct():>15} {r.false_share.pct():>15} {r.runs_per_candidate.num():>11} "
                     f"{cost.num():>12}")
    return "\n".join(lines)


def plot_power_cost(results: Sequence[ScenarioResult], units: Mapping[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r.power.value is None:
            continue
        u = units.get(r.protocol, 1.0)
        ax.errorbar(r.cost_per_candidate.value / u, r.power.value, yerr=r.power.se, fmt="o")
        ax.annotate(f"{r.protocol} ({r.scenario.name})", (r.cost_per_candidate.value / u, r.power.value),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("cost per candidate (med-run equivalents, baselines included)")
    ax.set_ylabel("P(confirm | real effect)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_command(spec_files: Sequence[str], noise_from: str | None, effects: Sequence[float], candidates: int,
                replicates: int, seed: int, as_json: bool, png: str | None, threshold: float) -> str:
    """`fsearch simulate`: the text (or JSON) it prints; writes the PNG when asked."""
    import json
    import time

    from orchestrator.spec import find_spec_file, load_spec

    protocols = []
    for arg in spec_files:
        spec = load_spec(find_spec_file(arg))
        protocols.append(Protocol.from_spec(spec, name=Path(arg).stem))
    if not protocols:  # before and after: the original's protocol (ports pin it) and the default one
        protocols = [original_protocol(candidates, threshold), default_protocol(candidates, threshold)]
    noise = noise_from_round(noise_from) if noise_from else None

    def model_for(p: Protocol) -> OutcomeModel:
        return model_from_noise(p.spec, noise) if noise else OutcomeModel.uniform(p.spec)

    n_max = max(len(p.spec.candidates(t)) for p in protocols for t in p.spec.tasks)
    scenarios = [Scenario.null()] + [Scenario.one_real(n_max, e) for e in effects if e != 0]
    t0 = time.perf_counter()
    results = compare(protocols, model_for, scenarios, replicates, seed)
    units = {p.name: med_unit(p, model_for(p)) for p in protocols}
    if png:
        plot_power_cost(results, units, Path(png))
    if as_json:
        return json.dumps({"replicates": replicates, "seed": seed,
                           "noise": dataclasses.asdict(noise) if noise else "uniform: paired-delta SD 1 per stage",
                           "med_run_s": units,
                           "results": [r.as_dict() for r in results]}, indent=2)
    out = [f"{replicates} replicates per row, seed {seed}; effects in SDs of the seed-check paired delta; "
           f"{time.perf_counter() - t0:.1f} s"]
    if noise:
        out += ["noise from " + noise_from + ":"] + ["  " + n for n in noise.notes]
        out.append("  wall s per stage (median): " + ", ".join(f"{s} {w:.1f}" for s, w in noise.wall_s.items()))
    else:
        out.append("noise: paired-delta SD 1 at every stage, the same effect at every stage; quick run = 0.4 med")
    out += ["", format_results(results, units)]
    if png:
        out.append(f"\npower against cost: {png}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m orchestrator.simulate`: the default protocol, printed (for a quick look without the CLI)."""
    print(run_command([], None, [0.5, 1.0], 8, 2000, 0, False, None, 0.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------------------------------------------------------
# `fsearch validate`: is a spec's protocol more than noise, under the noise a round measured?
VALIDATE_REPLICATES = 200  # per scenario: a Monte-Carlo SE about 3.5 points on a rate near 50%, seconds in all
VALIDATE_SEED = 0
NOISY_SCREEN_PASS = 0.25  # a screen passing a null candidate more often than this is mostly noise
MAX_FAMILYWISE = 0.05
MIN_POWER = 0.5
POWER_EFFECT_SD = 1.0  # the real candidate's effect, in SDs of its task's seed-check paired delta
WARN_SE = 2.0  # a rate is past a limit when it is past it by this many Monte-Carlo SEs (a protocol built to hold
# exactly 5% must not warn on simulation noise)


def _above(e: Estimate, limit: float) -> bool:
    return e.value is not None and e.value - WARN_SE * (e.se or 0.0) > limit


def _below(e: Estimate, limit: float) -> bool:
    return e.value is not None and e.value + WARN_SE * (e.se or 0.0) < limit


@dataclass
class TaskNoiseCheck:
    task: str
    matched: str  # which of the noise round's tasks gave the SDs, and how it was matched
    sd: dict[str, float]  # stage -> paired-delta SD simulated
    screen_pass_null: dict[str, Estimate]  # gate stage -> P(a null FS candidate that reaches it passes)
    screen_rule: dict[str, str]  # gate stage -> its rule and seed count, for the advice
    fwer: Estimate  # P(any of the task's candidates confirmed | every candidate null)
    power: Estimate  # P(the first FS candidate confirmed | it has a +POWER_EFFECT_SD effect)
    cost_per_candidate_s: float  # wall seconds per candidate, baselines included (every candidate null)
    med_run_s: float

    def line(self) -> str:
        sds = ", ".join(f"{s} {v:.3g}" for s, v in self.sd.items())
        screens = ", ".join(f"{s} {_pct(e)}" for s, e in self.screen_pass_null.items()) or "no screen"
        return (f"{self.task} ({self.matched}; paired-delta SD {sds}): a null candidate passes {screens}; "
                f"family-wise P(any confirmation | all null) {_pct(self.fwer)}; power at +{POWER_EFFECT_SD:g} SD "
                f"{_pct(self.power)}; cost {self.cost_per_candidate_s / self.med_run_s:.2f} med runs "
                f"({self.cost_per_candidate_s:.0f} s) per candidate")

    def warnings(self) -> list[str]:
        out = []
        for stage, e in self.screen_pass_null.items():
            if _above(e, NOISY_SCREEN_PASS):
                rule = self.screen_rule[stage]
                advice = ("a halving screen over so few candidates keeps many by rank: more candidates, a smaller "
                          "keep or more rungs" if rule.startswith("halving")
                          else "run more seeds (screen: halving)")
                out.append(f"{self.task} {stage} screen ({rule}): a candidate with no effect passes "
                           f"{100 * e.value:.0f}% of the time: it is mostly noise; {advice}")
        if _above(self.fwer, MAX_FAMILYWISE):
            out.append(f"{self.task}: the seed check confirms a candidate with no effect in {100 * self.fwer.value:.1f}%"
                       f" of rounds (> {100 * MAX_FAMILYWISE:g}%): use the sequential check on fresh seeds "
                       f"(seedcheck.rule: sequential) or more seeds")
        if _below(self.power, MIN_POWER):
            sd = self.sd.get(DECISION_STAGE)
            unit = f" ({sd:.3g})" if sd is not None else ""
            out.append(f"{self.task}: a real effect of +{POWER_EFFECT_SD:g} SD{unit} is confirmed in only "
                       f"{100 * self.power.value:.0f}% of rounds (< {100 * MIN_POWER:g}%): more seeds in the screens "
                       f"and the seed check (seedcheck.looks)")
        return out


@dataclass
class NoiseCheck:
    source: str
    replicates: int
    seed: int
    tasks: list[TaskNoiseCheck]
    unmatched: list[str]  # spec tasks with no known noise: nothing simulated is said of them
    round_fwer: Estimate | None  # over every task, where every task's noise is known
    seconds: float

    def lines(self) -> list[str]:
        if not self.tasks:
            return [f"error rates: {self.source} measured no noise for this spec's tasks "
                    f"({', '.join(self.unmatched)}); not simulated"]
        out = [f"error rates under the noise measured in {self.source} ({self.replicates} simulated rounds per "
               f"scenario, seed {self.seed}, {self.seconds:.1f} s):"]
        out += ["  " + t.line() for t in self.tasks]
        out += [f"  {label}: no noise measured for this task there; not simulated" for label in self.unmatched]
        if self.round_fwer is not None and len(self.tasks) > 1:
            out.append(f"  round: family-wise P(any confirmation | all null) {_pct(self.round_fwer)}")
        return out

    def warnings(self) -> list[str]:
        out = [w for t in self.tasks for w in t.warnings()]
        if self.round_fwer is not None and len(self.tasks) > 1 and _above(self.round_fwer, MAX_FAMILYWISE):
            out.append(f"the round confirms a candidate with no effect in {100 * self.round_fwer.value:.1f}% of "
                       f"rounds (> {100 * MAX_FAMILYWISE:g}%)")
        return out


def _pct(e: Estimate) -> str:
    return "-" if e.value is None else f"{100 * e.value:.0f}%"


def _round_tasks(round_dir: Path) -> dict[str, tuple[str, Any]]:
    """The noise round's tasks: label -> (kind, params), read from its spec.yaml as plain YAML (a round written under
    an older schema still names its tasks)."""
    import yaml

    from orchestrator.paths import RoundPaths

    path = RoundPaths(round_dir).spec
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict):
        return {}
    return {str(label): (t.get("task"), t.get("params") or {}) for label, t in tasks.items() if isinstance(t, dict)}


def match_noise(spec: Spec, noise: MeasuredNoise, round_tasks: Mapping[str, tuple[str, Any]]) \
        -> dict[str, tuple[str, str]]:
    """spec task -> (noise round task, how matched): the same label, else the same task kind and parameters."""
    out = {}
    for label, t in spec.tasks.items():
        if label in noise.task_sd:
            out[label] = (label, "noise of the same task label")
            continue
        same = [n for n, (kind, params) in round_tasks.items()
                if n in noise.task_sd and kind == t.task and params == t.params]
        if same:
            out[label] = (same[0], f"noise of the round's {same[0]}: same task and parameters")
    return out


def uses_noisy_screens(spec: Spec) -> bool:
    """Absolute thresholds and a one-seed threshold screen: the original's layout, whose screens are coin flips when
    the threshold is far below the seed noise."""
    from orchestrator.decisions import is_gate

    absolute = any(isinstance(t.threshold, float) for t in spec.tasks.values())
    one_seed = any(is_gate(name) and st.screen.rule == "threshold" and len(st.seeds) == 1
                   for name, st in spec.stage_list())
    return absolute and one_seed


def check_noise(spec: Spec, noise_round: str | Path, replicates: int = VALIDATE_REPLICATES,
                seed: int = VALIDATE_SEED) -> NoiseCheck:
    """The spec's protocol, simulated (real planner and decision rules) under the paired-delta SDs and wall times
    measured in `noise_round`, for the spec's tasks whose noise is known there: per task, how often a null candidate
    passes each screen, P(any confirmation) with every candidate null, power at +1 SD, and cost per candidate. The
    spec's tasks without known noise are simulated at the round's median SD (they share the seed check's error
    family with the others) but nothing is said of them."""
    import time

    from orchestrator.decisions import is_gate

    noise = noise_from_round(noise_round)
    matches = match_noise(spec, noise, _round_tasks(Path(noise_round)))
    if not matches:
        return NoiseCheck(str(noise_round), replicates, seed, [], list(spec.tasks), None, 0.0)
    protocol = Protocol.from_spec(spec)
    stages = [name for name, _ in spec.stage_list()]
    task_sd: dict[str, dict[str, float]] = {}
    for label, (source, _) in matches.items():
        own = noise.task_sd[source]
        # a stage the noise round did not measure borrows the task's seed-check SD, as noise_from_round does
        fallback = own.get(DECISION_STAGE, statistics.median(own.values()))
        task_sd[label] = {s: own.get(s, fallback) for s in stages}
    model = dataclasses.replace(model_from_noise(spec, noise), task_noise_sd=task_sd)
    unit_s = med_unit(protocol, model)
    known = list(matches)
    t0 = time.perf_counter()

    def rounds(scenario: Scenario) -> list[ReplicateOutcome]:
        rng = random.Random(f"{seed}/validate/{scenario.name}")
        return [run_replicate(protocol, model, scenario, rng) for _ in range(replicates)]

    fs_position = {label: next((i for i, c in enumerate(spec.candidates(label)) if not spec.is_control(label, c.name)),
                               None) for label in known}
    n_max = max(len(spec.candidates(label)) for label in spec.tasks)
    with memoized_pure_functions():
        null = rounds(Scenario.null())
        real = {pos: rounds(Scenario.one_real(n_max, POWER_EFFECT_SD, pos))
                for pos in sorted({p for p in fs_position.values() if p is not None})}
    checks = []
    for label in known:
        gates = [(name, st) for name, st in spec.stage_list() if is_gate(name)]
        passed: dict[str, list[float]] = {name: [] for name, _ in gates}
        entered: dict[str, list[float]] = {name: [] for name, _ in gates}
        for out in null:
            for name, _ in gates:
                ds = [d for d in out.stage_decisions if d.task == label and d.stage == name and not d.control]
                entered[name].append(len(ds))
                passed[name].append(sum(d.decision == "promote" for d in ds))
        fwer = _mean([float(any(lab == "confirmed" for (t, _), lab in out.seedcheck.items() if t == label))
                      for out in null])
        pos = fs_position[label]
        if pos is None:
            power = Estimate(None, None)
        else:
            name = spec.candidates(label)[pos].name
            power = _mean([float(out.seedcheck.get((label, name)) == "confirmed") for out in real[pos]])
        n_cand = len(spec.candidates(label))
        checks.append(TaskNoiseCheck(
            task=label, matched=matches[label][1], sd=task_sd[label],
            screen_pass_null={name: _ratio(passed[name], entered[name]) for name, _ in gates},
            screen_rule={name: f"{st.screen.rule}, {len(st.seeds)} seed{'s' if len(st.seeds) > 1 else ''}"
                         for name, st in gates},
            fwer=fwer, power=power,
            cost_per_candidate_s=math.fsum(out.task_wall_s.get(label, 0.0) for out in null) / len(null) / n_cand,
            med_run_s=unit_s))
    unmatched = [label for label in spec.tasks if label not in matches]
    round_fwer = None if unmatched else _mean([float("confirmed" in out.seedcheck.values()) for out in null])
    return NoiseCheck(str(noise_round), replicates, seed, checks, unmatched, round_fwer, time.perf_counter() - t0)


def validate_noise(spec: Spec, noise_from: str | None) -> tuple[list[str], list[str]]:
    """`fsearch validate`'s error-rate check: (lines, warnings). The noise comes from `noise_from`; without it, from
    the spec's own round folder where the spec has the original's noisy screens and that round has records (a
    resumed round); else there is no known noise and nothing is said."""
    from orchestrator.paths import RoundPaths

    if noise_from is None:
        own = spec.round_dir
        if not (uses_noisy_screens(spec) and RoundPaths(own).records.is_file()):
            return [], []
        try:
            check = check_noise(spec, own)
        except UserError as e:
            return [f"error rates: the round's own records measure no noise yet ({e})"], []
    else:
        check = check_noise(spec, noise_from)
    return check.lines(), check.warnings()
