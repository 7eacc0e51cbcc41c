"""Decision rules shared by the planner, the report and the simulator: every promote/prune, finalist and seed-check
decision of a round is made by a function of this module, so the report (and its check) reads the same decision the
planner acted on instead of working it out a second time.

    stage_rank(stage)                          the order of stages (STAGE_ORDER; unknown stages last)
    is_gate(stage)                             does the stage screen (promote/prune)?
    mean_delta(deltas)                         the stage's mean paired delta
    meets_threshold(delta, threshold)          the promotion test of one delta
    ScreenRule / DeltaThresholdRule            a screening stage's decision for one candidate (SCREEN_RULE: default)
    screen(stage, seeds, deltas, failure, threshold, rule)
                                               one candidate's decision at one stage (ScreenDecision)
    run_decision(...)                          the decision a single run's record carries
    rank_by_delta(names, deltas)               best mean delta first, ties in spec order
    select_finalists(names, deltas, limit)     the seed check's finalists after the last screening stage
    SeedCheckRule                              the seed check's confirmed / inconclusive / rejected rule
    lower_is_better(metric)                    orientation of a metric
    HalvingRule                                a multi-seed screen: successive halving over seeds (rungs)
    is_chance_tie(...)                         candidate and baseline both at the task's chance level
    worst_value(metric, observed)              what a failed or diverged candidate seed counts as
    SequentialCheckRule                        the sequential seed check on fresh seeds (confirmed / rejected /
                                               inconclusive / continue), Pocock boundary, Bonferroni over finalists
    split_finalists(...)                       FS finalists and controls, each with its own quota

Everything here is pure (no I/O, no clock): the same inputs give the same decision.

The protocol in words (the default; a spec may pin the original's rules, see README "Protocol and statistics"):

- Screening stages (quick, med) with `screen: {rule: halving}` run in rungs of seeds (cumulative counts, e.g. 1, 3,
  7). Synchronously, after every run of a rung has a record: a candidate whose seeds' one-sided t upper bound (level
  `drop_p`) lies below the threshold is dropped; of the rest the best `keep` share by mean paired delta (ties in spec
  order, at least one) goes on to the next rung; the last rung's survivors are promoted. A candidate and baseline
  both at the task's chance level on every seed is a tie at chance: no evidence, never promoted.
- A failed or diverged candidate seed is never dropped: its value counts as the metric's worst value (0 for a rate,
  whose scale starts at 0; for a lower-is-better metric, the worst value observed in that stage), so its delta is
  as bad as the stage allows. A baseline seed that failed for good removes that seed's pair from every candidate of
  the stage, and the reason says so; a rule that then has fewer pairs than it needs cannot promote or confirm.
- The seed check (`rule: sequential`) runs on fresh seeds (`seedcheck.seeds`, by default offset past every
  screening seed, so no seed that selected a candidate takes part in confirming it) and decides on the held-out
  test metric (selection used validation). At planned looks n_1 < ... < n_K paired seeds it computes the one-sided
  paired t statistic of d_s = candidate_s - baseline_s. Confirmed when the one-sided p <= c and the mean reaches the
  threshold, where c is the Pocock constant nominal level for the t statistic at those looks
  (stats.pocock_t_level) for alpha / m, m the round's FS finalist slots (per task, max_finalists or the fewer the
  screens can promote: planner.finalist_slots, fixed by the spec before any data; Bonferroni over finalists).
  Rejected when the one-sided upper bound at the same level lies below the threshold; stopped for futility
  (inconclusive) when the mean delta is <= 0 at a look; otherwise more seeds, up to the last look, after which it is
  inconclusive. Stopping to reject or for futility makes no claim,
  so it can only lower the error rate: P(any FS finalist confirmed | no candidate has an effect) <= alpha across
  looks and finalists. Controls form their own family (alpha / controls' slots).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, Mapping, Protocol, Sequence

from orchestrator.spec import GATE_STAGES, STAGE_ORDER
from orchestrator.stats import SIGN_FLIP_EXACT_MAX_N, PairedStats, holm, pocock_t_level, sample_sd, t_ppf, t_sf

__all__ = [
    "STAGE_ORDER", "GATE_STAGES", "SEEDCHECK", "LOWER_IS_BETTER", "THRESHOLD_TOLERANCE", "stage_rank", "is_gate",
    "mean_delta", "meets_threshold", "ScreenDecision", "ScreenRule", "DeltaThresholdRule", "SCREEN_RULE", "screen",
    "run_decision", "rank_by_delta", "select_finalists", "SeedCheckRule", "lower_is_better", "HalvingRule",
    "is_chance_tie", "worst_value", "SequentialCheckRule", "SequentialLook", "split_finalists",
    "CHANCE_TOLERANCE",
]

SEEDCHECK = "seedcheck"
LOWER_IS_BETTER = ("loss",)  # metrics (without their val_/test_ prefix) where a smaller value is better

# Metrics are means of per-example scores, so two runs with the same number of correct cells can differ in the last
# bits (0.22916666666666663 vs ...674). A delta within this of the threshold counts as meeting it.
THRESHOLD_TOLERANCE = 1e-9

ScreenKind = Literal["promote", "prune", "pending", "recorded", "statistics"]
RunDecisionKind = Literal["baseline", "promote", "prune", "recorded", "failed", "diverged"]
SeedCheckLabel = Literal["confirmed", "inconclusive", "rejected"]


# ---------------------------------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------------------------------
def stage_rank(stage: str) -> tuple[int, str]:
    """Sort key of a stage name: the spec's stage order, names it does not know after them (alphabetically)."""
    return (STAGE_ORDER.index(stage), "") if stage in STAGE_ORDER else (len(STAGE_ORDER), stage)


def is_gate(stage: str) -> bool:
    """A screening stage: its decision promotes or prunes candidates."""
    return stage in GATE_STAGES


def lower_is_better(metric: str) -> bool:
    for prefix in ("val_", "test_"):
        if metric.startswith(prefix):
            metric = metric[len(prefix):]
            break
    return metric in LOWER_IS_BETTER


# ---------------------------------------------------------------------------------------------------------------------
# screening
# ---------------------------------------------------------------------------------------------------------------------
def mean_delta(deltas: Sequence[float]) -> float | None:
    """The mean of a candidate's paired deltas over a stage's seeds (fsum: independent of the seeds' order)."""
    return math.fsum(deltas) / len(deltas) if deltas else None


def meets_threshold(delta: float, threshold: float) -> bool:
    return delta >= threshold - THRESHOLD_TOLERANCE


@dataclass(frozen=True)
class ScreenDecision:
    """One candidate's decision at one stage.

    decision: promote / prune (a screening stage, complete), pending (a screening stage with runs still missing),
    recorded (long: measured, promotes nothing), statistics (seedcheck: decided by SeedCheckRule).
    mean_delta: the mean over the seeds with a delta, None when a run failed or none has one.
    reason: the decision in words (planner status lines and the report use it)."""

    stage: str
    decision: ScreenKind
    mean_delta: float | None
    threshold: float
    reason: str


class ScreenRule(Protocol):
    """How a complete screening stage decides one candidate from its paired deltas (seed -> delta)."""

    def decide(self, stage: str, deltas: Mapping[int, float], threshold: float) -> ScreenDecision: ...


@dataclass(frozen=True)
class DeltaThresholdRule:
    """The original system's screen: promote when the mean paired delta over the stage's seeds reaches the task's
    threshold (within THRESHOLD_TOLERANCE), prune otherwise."""

    def decide(self, stage: str, deltas: Mapping[int, float], threshold: float) -> ScreenDecision:
        mean = mean_delta(list(deltas.values()))
        if mean is not None and meets_threshold(mean, threshold):
            return ScreenDecision(stage, "promote", mean, threshold, f"{stage} delta {mean:+.4g} >= threshold "
                                                                     f"{threshold:g}")
        return ScreenDecision(stage, "prune", mean, threshold, f"{stage} delta {mean:+.4g} < threshold {threshold:g}")


SCREEN_RULE: ScreenRule = DeltaThresholdRule()


def screen(stage: str, seeds: Sequence[int], deltas: Mapping[int, float | None], failure: str | None,
           threshold: float, rule: ScreenRule | None = None) -> ScreenDecision:
    """One candidate's decision at `stage` from its paired deltas so far (seed -> delta, None where its run or the
    matched baseline has no value) and `failure` (why one of its runs failed, None if none did).

    A failed or diverged candidate run prunes it at a screening stage (and leaves no mean); a stage with a seed still
    missing is pending; a complete screening stage is decided by `rule` (None: the module's SCREEN_RULE, looked up at
    each call, so a rule plugged in there reaches the planner and the report alike). Outside screening stages nothing
    is decided here: long is recorded, seedcheck goes to SeedCheckRule."""
    ok = {s: d for s, d in deltas.items() if d is not None}
    mean = mean_delta(list(ok.values())) if failure is None else None
    if not is_gate(stage):
        kind: ScreenKind = "statistics" if stage == SEEDCHECK else "recorded"
        why = f"{stage} {failure}" if failure else f"{stage} mean delta {mean:+.4g} over {len(ok)} seeds" \
            if mean is not None else f"{stage} no paired delta"
        return ScreenDecision(stage, kind, mean, threshold, why)
    if failure is not None:
        return ScreenDecision(stage, "prune", None, threshold, f"{stage} {failure}")
    if any(s not in ok for s in seeds):
        return ScreenDecision(stage, "pending", mean, threshold, f"{stage} waiting for {len(seeds) - len(ok)} seed(s)")
    return (rule or SCREEN_RULE).decide(stage, {s: ok[s] for s in seeds}, threshold)


def run_decision(is_baseline: bool, status: str, stage: str, stage_seeds: int, delta: float | None,
                 threshold: float | None) -> RunDecisionKind:
    """The decision one run's record carries. Baselines: "baseline"; failed/diverged runs: their status; a candidate
    of a one-seed screening stage: that stage's decision (SCREEN_RULE on its one delta, as the stage decision will
    be); otherwise "recorded" (a multi-seed stage decides on the mean; long and seedcheck are decided later)."""
    if status in ("failed", "diverged"):
        return status  # type: ignore[return-value]
    if is_baseline:
        return "baseline"
    if delta is not None and threshold is not None and is_gate(stage) and stage_seeds == 1:
        return SCREEN_RULE.decide(stage, {0: delta}, threshold).decision  # type: ignore[return-value]
    return "recorded"


# ---------------------------------------------------------------------------------------------------------------------
# finalists
# ---------------------------------------------------------------------------------------------------------------------
def rank_by_delta(names: Sequence[str], deltas: Mapping[str, float | None]) -> list[str]:
    """Best mean delta first; a name without a delta last; ties keep the given (spec) order."""
    def key(name: str) -> float:
        d = deltas.get(name)
        return math.inf if d is None else -d
    return sorted(names, key=key)


def select_finalists(names: Sequence[str], deltas: Mapping[str, float | None], max_finalists: int) -> list[str]:
    """The seed check's finalists: the survivors of the last screening stage, best delta first, at most
    `max_finalists` (spec stages.seedcheck.max_finalists)."""
    return rank_by_delta(names, deltas)[:max_finalists]


# ---------------------------------------------------------------------------------------------------------------------
# the seed check
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedCheckRule:
    """Seed-check decision for every finalist of a round (see `text()` for the rule in words)."""

    alpha: float = 0.05  # family-wise error level (Holm) and level of the sign-flip veto
    confidence: float = 0.95  # the reported t-interval
    min_pairs: int = 2  # fewer paired seeds: no interval, always inconclusive

    def holm_family(self, stats: Sequence[PairedStats | None]) -> list[float]:
        """Holm-adjusted two-sided t p-values of the round's finalists; a finalist without one counts as p = 1."""
        raw = [s.p_t_two_sided if s is not None and s.p_t_two_sided is not None else 1.0 for s in stats]
        return holm(raw)

    def decide(self, s: PairedStats | None, threshold: float, p_holm: float) -> tuple[SeedCheckLabel, str]:
        if s is None or s.n < self.min_pairs or s.ci_low is None or s.ci_high is None:
            n = 0 if s is None else s.n
            return "inconclusive", f"only {n} paired seed(s); the rule needs at least {self.min_pairs}"
        if s.ci_high < threshold:
            return "rejected", f"95% interval upper bound {s.ci_high:+.4g} < threshold {threshold:g}"
        failed = []
        if not s.ci_low > 0:
            failed.append(f"interval lower bound {s.ci_low:+.4g} <= 0")
        if not p_holm < self.alpha:
            failed.append(f"Holm-adjusted t p {p_holm:.4g} >= {self.alpha:g}")
        if not s.p_sign_flip_greater < self.alpha:
            failed.append(f"one-sided sign-flip p {s.p_sign_flip_greater:.4g} >= {self.alpha:g}")
        if not s.mean >= threshold:
            failed.append(f"mean {s.mean:+.4g} < threshold {threshold:g}")
        if failed:
            return "inconclusive", "; ".join(failed)
        return "confirmed", "all four conditions hold"

    def decide_family(self, stats: Sequence[PairedStats | None], thresholds: Sequence[float]) \
            -> list[tuple[SeedCheckLabel, str, float]]:
        """Every finalist of the round at once (the Holm family): (label, reason, Holm-adjusted p) per finalist."""
        adjusted = self.holm_family(stats)
        return [(*self.decide(s, t, p), p) for s, t, p in zip(stats, thresholds, adjusted)]

    def min_seeds_for_sign_flip(self) -> int:
        """Smallest n whose best one-sided sign-flip p (2^-n) is below alpha."""
        n = 1
        while 2.0 ** -n >= self.alpha:
            n += 1
        return n

    def text(self, m: int) -> str:
        pct = f"{self.confidence:.0%}"
        return "\n".join([
            f"For each finalist, d_s = candidate_s - baseline_s on every seed s where both the candidate and its "
            f"matched baseline (same task, stage, seed, batch, steps, eval cadence, n_val, data seed) finished with "
            f"a value; higher is better. Statistics: mean, sample SD, the t-based {pct} interval "
            f"mean ± t(n-1, {(1 + self.confidence) / 2:g})·SD/√n, the paired t-test, the exact sign-flip test "
            f"(all 2^n sign patterns of the deltas, statistic sum(d)) and the exact Wilcoxon signed-rank test.",
            "",
            f"- **confirmed** when all four hold: (1) the {pct} t-interval lies above zero; (2) the Holm-adjusted "
            f"two-sided paired-t p-value is below {self.alpha:g}, the family being all m = {m} finalist(s) of the "
            f"round across tasks (for m = 1 this is the same statement as (1): the interval stays above zero after "
            f"Holm correction); (3) the exact one-sided sign-flip p-value (H1: candidate better) is below "
            f"{self.alpha:g}, a distribution-free veto; (4) the mean delta reaches the task's threshold.",
            f"- **rejected** when the {pct} t-interval's upper bound is below the task's threshold: the seeds rule "
            f"out a gain of the size the task asks for (every candidate credibly worse than its baseline included).",
            f"- **inconclusive** otherwise, and whenever fewer than {self.min_pairs} seeds are paired: more seeds "
            f"are needed before anything is claimed.",
            "",
            f"Why this rule: the smallest sign-flip p-value with n seeds is 2^-n (one-sided) or 2^(1-n) "
            f"(two-sided); with 5 seeds that is 1/32 = 0.031 and 2/32 = 0.0625. A two-sided sign-flip test can "
            f"therefore never pass at {self.alpha:g} with 5 seeds, and Holm over m ≥ 2 sign-flip p-values could "
            f"never pass either (the first Holm level is {self.alpha:g}/m ≤ 0.025 < 1/32). The multiplicity "
            f"correction is therefore applied to the t-test's p-values, which are continuous, and the exact "
            f"sign-flip test acts as a one-sided veto at {self.alpha:g}, which needs at least "
            f"{self.min_seeds_for_sign_flip()} seeds (at 5 seeds: every paired delta positive). Sign-flip p-values "
            f"are exact for n ≤ {SIGN_FLIP_EXACT_MAX_N} (Monte Carlo with a fixed seed above). Wilcoxon p-values "
            f"are reported for robustness and do not enter the decision. A rejection needs no multiplicity "
            f"correction (it claims no gain).",
        ])


# ---------------------------------------------------------------------------------------------------------------------
# multi-seed screens: successive halving over seeds
# ---------------------------------------------------------------------------------------------------------------------
# A metric value within this of the task's chance level counts as chance (a model that outputs one constant token can
# sit a little below the uniform guesser's level, e.g. 0.2344 against 0.25 on sudoku base 2).
CHANCE_TOLERANCE = 0.02


def is_chance_tie(candidate_values: Sequence[float], baseline_values: Sequence[float], chance: float | None,
                  metric: str = "", tolerance: float = CHANCE_TOLERANCE) -> bool:
    """Candidate and baseline both no better than chance (mean over the seeds): their delta is no evidence."""
    if chance is None or not candidate_values or not baseline_values:
        return False
    sign = -1.0 if lower_is_better(metric) else 1.0
    at_chance = lambda vs: sign * (math.fsum(vs) / len(vs) - chance) <= tolerance  # noqa: E731
    return at_chance(candidate_values) and at_chance(baseline_values)


def worst_value(metric: str, observed: Sequence[float]) -> float:
    """The value a failed or diverged candidate seed counts as: the worst the metric allows. Rates (every
    higher-is-better metric of the task registry is a share in [0, 1]) start at 0; a lower-is-better metric has no
    worst value, so the worst one observed in the stage (baselines included) is used."""
    if lower_is_better(metric):
        return max(observed) if observed else math.inf
    return min(0.0, min(observed, default=0.0))


@functools.lru_cache(maxsize=4096)
def _critical_t(level: float, df: int) -> float:
    return t_ppf(1.0 - level, df)


def _upper_bound(deltas: Sequence[float], level: float) -> float:
    """One-sided (1 - level) t upper bound of the mean; with every delta equal, the mean itself."""
    n, mean = len(deltas), math.fsum(deltas) / len(deltas)
    sd = sample_sd(deltas) or 0.0
    return mean + (_critical_t(level, n - 1) * sd / math.sqrt(n) if n >= 2 else math.inf)


@dataclass(frozen=True)
class HalvingRule:
    """Successive halving over seeds. At each rung (a cumulative number of seeds), after every run has a record:
    drop a candidate whose one-sided (1 - drop_p) t upper bound of the mean delta lies below the threshold (needs two
    seeds), then keep the best `keep` share of the rest by mean delta (ceil, at least one; ties in spec order). At the
    last rung the kept candidates are promoted if their mean delta reaches the threshold. A tie at chance is pruned."""

    keep: float = 0.5
    drop_p: float = 0.1

    def rung(self, stage: str, deltas: Mapping[str, Sequence[float]], threshold: float, last: bool,
             chance_ties: frozenset[str] = frozenset()) -> dict[str, ScreenDecision]:
        """Decisions of one rung for the candidates in `deltas` (spec order; each its deltas on the rung's seeds):
        "promote" = on to the next rung (or, at the last rung, promoted), "prune" = out."""
        out: dict[str, ScreenDecision] = {}
        alive = []
        for name, ds in deltas.items():
            mean = mean_delta(ds)
            if name in chance_ties:
                out[name] = ScreenDecision(stage, "prune", mean, threshold,
                                           f"{stage} tie at chance level over {len(ds)} seed(s): no evidence")
            elif len(ds) >= 2 and _upper_bound(ds, self.drop_p) < threshold - THRESHOLD_TOLERANCE:
                out[name] = ScreenDecision(stage, "prune", mean, threshold,
                                           f"{stage} mean delta {mean:+.4g} over {len(ds)} seeds credibly below "
                                           f"threshold {threshold:g} (one-sided {1 - self.drop_p:.0%} bound)")
            else:
                alive.append(name)
        n_keep = max(1, math.ceil(self.keep * len(alive) - 1e-9)) if alive else 0
        ranked = rank_by_delta(alive, {n: mean_delta(deltas[n]) for n in alive})
        for rank, name in enumerate(ranked):
            ds = deltas[name]
            mean = mean_delta(ds)
            if rank >= n_keep:
                out[name] = ScreenDecision(stage, "prune", mean, threshold,
                                           f"{stage} mean delta {mean:+.4g} over {len(ds)} seeds not among the best "
                                           f"{n_keep} of {len(alive)} (halving, keep {self.keep:g})")
            elif last and not (mean is not None and meets_threshold(mean, threshold)):
                out[name] = ScreenDecision(stage, "prune", mean, threshold,
                                           f"{stage} mean delta {mean:+.4g} over {len(ds)} seeds < threshold "
                                           f"{threshold:g}")
            else:
                out[name] = ScreenDecision(stage, "promote", mean, threshold,
                                           f"{stage} mean delta {mean:+.4g} over {len(ds)} seeds, rank {rank + 1} of "
                                           f"{len(alive)}" + (" (halving)" if last else " (next rung)"))
        return {name: out[name] for name in deltas}


def split_finalists(names: Sequence[str], deltas: Mapping[str, float | None], controls: frozenset[str] | set[str],
                    max_finalists: int, max_controls: int) -> list[str]:
    """The seed check's finalists: the best `max_finalists` FS candidates and, in their own quota, the best
    `max_controls` controls (a control never takes an FS candidate's slot). FS first, each best delta first."""
    fs = [n for n in names if n not in controls]
    ctl = [n for n in names if n in controls]
    return rank_by_delta(fs, deltas)[:max_finalists] + rank_by_delta(ctl, deltas)[:max_controls]


# ---------------------------------------------------------------------------------------------------------------------
# the sequential seed check
# ---------------------------------------------------------------------------------------------------------------------
SequentialLabel = Literal["confirmed", "inconclusive", "rejected", "continue"]


@dataclass(frozen=True)
class SequentialLook:
    label: SequentialLabel
    reason: str
    n: int
    mean: float | None
    p_greater: float | None  # one-sided paired t p-value (H1: candidate better)
    level: float  # the nominal level per look


@dataclass(frozen=True)
class SequentialCheckRule:
    """Sequential paired-t check at planned looks with a Pocock constant nominal level (see the module docstring).
    `family`: the number of finalist slots the error level is split over (Bonferroni)."""

    looks: tuple[int, ...] = (4, 6, 8, 10, 12, 16)
    alpha: float = 0.05
    family: int = 1
    futility_mean: float = 0.0  # stop (inconclusive) when the mean delta is <= this at a look

    @property
    def level(self) -> float:
        return pocock_t_level(tuple(self.looks), self.alpha / max(1, self.family))

    @property
    def min_pairs(self) -> int:
        return self.looks[0]

    def next_look(self, n: int) -> int | None:
        """The number of pairs of the first look after n pairs (None past the last look)."""
        return next((k for k in self.looks if k > n), None)

    def decide(self, deltas: Sequence[float], threshold: float) -> SequentialLook:
        """The decision after the pairs `deltas` (the planner passes a look's worth: n is one of `looks`)."""
        n, c = len(deltas), self.level
        if n < self.looks[0]:
            return SequentialLook("continue", f"{n} of {self.looks[0]} paired seeds of the first look", n,
                                  mean_delta(deltas), None, c)
        look = max(k for k in self.looks if k <= n)
        mean = math.fsum(deltas) / n
        sd = sample_sd(deltas) or 0.0
        crit = _critical_t(c, n - 1)
        if sd > 0:
            t = mean / (sd / math.sqrt(n))
            p: float | None = t_sf(t, n - 1) if t >= crit or n >= self.looks[-1] else None
            passed = t >= crit
        else:
            p, passed = (0.0 if mean > 0 else 1.0), mean > 0
        at = f"after {n} paired seeds (look {self.looks.index(look) + 1} of {len(self.looks)}, nominal level {c:.4g})"
        if passed and meets_threshold(mean, threshold):
            return SequentialLook("confirmed", f"confirmed {at}: one-sided t p {p:.3g} <= {c:.4g}, mean "
                                               f"{mean:+.4g} >= threshold {threshold:g}", n, mean, p, c)
        if mean + crit * sd / math.sqrt(n) < threshold - THRESHOLD_TOLERANCE:
            return SequentialLook("rejected", f"rejected {at}: one-sided upper bound "
                                              f"{mean + crit * sd / math.sqrt(n):+.4g} < threshold {threshold:g}",
                                  n, mean, p, c)
        if mean <= self.futility_mean:
            return SequentialLook("inconclusive", f"stopped for futility {at}: mean delta {mean:+.4g} <= "
                                                  f"{self.futility_mean:g}", n, mean, p, c)
        if n >= self.looks[-1]:
            return SequentialLook("inconclusive", f"no decision {at}, the last look: mean {mean:+.4g}", n, mean, p, c)
        return SequentialLook("continue", f"more seeds {at}: mean {mean:+.4g}", n, mean, p, c)
