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

Everything here is pure (no I/O, no clock): the same inputs give the same decision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Protocol, Sequence

from orchestrator.spec import GATE_STAGES, STAGE_ORDER
from orchestrator.stats import SIGN_FLIP_EXACT_MAX_N, PairedStats, holm

__all__ = [
    "STAGE_ORDER", "GATE_STAGES", "SEEDCHECK", "LOWER_IS_BETTER", "THRESHOLD_TOLERANCE", "stage_rank", "is_gate",
    "mean_delta", "meets_threshold", "ScreenDecision", "ScreenRule", "DeltaThresholdRule", "SCREEN_RULE", "screen",
    "run_decision", "rank_by_delta", "select_finalists", "SeedCheckRule", "lower_is_better",
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
    each call, so a rule plugged in there reaches the planner and the report alike). Outside screening stages nothing is decided
    here: long is recorded, seedcheck goes to SeedCheckRule."""
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
