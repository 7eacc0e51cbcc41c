"""Statistics for the seed check: paired per-seed deltas of a candidate against its matched baseline.

Pure Python (math, fractions, bisect, random); no numpy or scipy at run time (scipy is the tests' oracle).

- Student t distribution: CDF through the regularized incomplete beta function (Lentz's continued fraction),
  quantile by bracketing + bisection on that CDF.
- Paired t: mean, sample SD, t-based two-sided interval, one- and two-sided p-values.
- Exact sign-flip (permutation) test on the deltas: the null distribution of sum(d) over all 2^n sign patterns,
  in exact integer arithmetic (every float is a dyadic rational, so ties between patterns are decided exactly),
  counted by meet-in-the-middle. Exact for n <= SIGN_FLIP_EXACT_MAX_N; above that a Monte Carlo estimate with a
  fixed seed (reported as not exact).
- Wilcoxon signed-rank: zeros dropped (Wilcoxon's method), tied |d| get mid-ranks, and the p-value comes from the
  exact conditional null distribution of R+ given those ranks (for data without ties or zeros this is the classical
  exact distribution).
- Holm's step-down adjustment of a family of p-values.

The seed check's decision made from these statistics is orchestrator.decisions.SeedCheckRule.

Orientation: d_s = candidate_s - baseline_s with higher = better; "greater" alternatives test "candidate better".
"""
from __future__ import annotations

import bisect
import functools
import math
import random
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Literal, Sequence

Alternative = Literal["greater", "less", "two-sided"]

SIGN_FLIP_EXACT_MAX_N = 32  # exact enumeration (meet-in-the-middle: 2 x 2^16 partial sums at n = 32)
SIGN_FLIP_MC_DRAWS = 100_000  # above that: Monte Carlo with a fixed seed
SIGN_FLIP_MC_SEED = 0

_BETACF_MAX_ITER = 10_000
_BETACF_EPS = 1e-16
_TINY = 1e-300


# ---------------------------------------------------------------------------------------------------------------------
# Student t distribution
# ---------------------------------------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz); converges for x < (a+1)/(a+b+2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _BETACF_MAX_ITER + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _BETACF_EPS:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def _ibeta_parts(a: float, b: float, x: float, one_minus_x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function; `one_minus_x` is passed exactly to avoid cancellation."""
    if x <= 0.0:
        return 0.0
    if one_minus_x <= 0.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log(one_minus_x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, one_minus_x) / b


def t_sf(t: float, df: float) -> float:
    """P(T >= t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t distribution needs df > 0, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    t2 = t * t
    # tail = P(|T| >= |t|) = I_{df/(df+t^2)}(df/2, 1/2); both x and 1-x computed without cancellation
    tail = _ibeta_parts(0.5 * df, 0.5, df / (df + t2), t2 / (df + t2))
    return 0.5 * tail if t >= 0 else 1.0 - 0.5 * tail


def t_cdf(t: float, df: float) -> float:
    """P(T <= t)."""
    return t_sf(-t, df)


def t_ppf(p: float, df: float) -> float:
    """The p-quantile of Student's t (inverse CDF), by bracketing and bisection on the upper tail."""
    if not 0.0 < p < 1.0:
        if p == 0.0:
            return -math.inf
        if p == 1.0:
            return math.inf
        raise ValueError(f"t quantile needs 0 <= p <= 1, got {p}")
    if p == 0.5:
        return 0.0
    q = 1.0 - p if p > 0.5 else p  # solve t_sf(x) = q for x > 0, then restore the sign
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > q:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            return math.inf if p > 0.5 else -math.inf
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_sf(mid, df) > q:
            lo = mid
        else:
            hi = mid
    x = 0.5 * (lo + hi)
    return x if p > 0.5 else -x


# ---------------------------------------------------------------------------------------------------------------------
# exact arithmetic helpers
# ---------------------------------------------------------------------------------------------------------------------
def _as_integers(values: Sequence[float]) -> list[int]:
    """Scale finite floats by one power of two so that every value is an exact integer (ratios preserved exactly)."""
    fracs = []
    for v in values:
        if not math.isfinite(v):
            raise ValueError(f"statistics need finite deltas, got {v!r}")
        fracs.append(Fraction(v))
    den = max((f.denominator for f in fracs), default=1)  # all denominators are powers of two
    return [int(f * den) for f in fracs]


def _subset_sums(values: Sequence[int]) -> list[int]:
    """All 2^len sums of +-v (one entry per sign pattern)."""
    sums = [0]
    for v in values:
        sums = [s + v for s in sums] + [s - v for s in sums]
    return sums


# ---------------------------------------------------------------------------------------------------------------------
# sign-flip (paired permutation) test
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SignFlipResult:
    p_value: float
    exact: bool
    patterns: int  # sign patterns counted (2^n when exact, Monte Carlo draws otherwise)


def sign_flip_test(deltas: Sequence[float], alternative: Alternative = "two-sided") -> SignFlipResult:
    """Paired sign-flip permutation test of H0 "the deltas are symmetric about 0", statistic sum(d).

    p = #{sign patterns e: stat(e) at least as extreme as observed} / 2^n, counting the observed pattern;
    "greater": sum >= observed, "less": sum <= observed, "two-sided": |sum| >= |observed|.
    """
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be greater, less or two-sided, got {alternative!r}")
    ints = _as_integers(deltas)
    n = len(ints)
    if n == 0:
        raise ValueError("sign-flip test needs at least one delta")
    observed = sum(ints)
    if n <= SIGN_FLIP_EXACT_MAX_N:
        half = n // 2
        left = _subset_sums(ints[:half])
        right = sorted(_subset_sums(ints[half:]))
        total = len(left) * len(right)
        count = sum(_count_extreme(a, observed, right, alternative) for a in left)
        return SignFlipResult(count / total, True, total)
    rng = random.Random(SIGN_FLIP_MC_SEED)
    count = 0
    for _ in range(SIGN_FLIP_MC_DRAWS):
        s = sum(v if rng.random() < 0.5 else -v for v in ints)
        count += _is_extreme(s, observed, alternative)
    return SignFlipResult((count + 1) / (SIGN_FLIP_MC_DRAWS + 1), False, SIGN_FLIP_MC_DRAWS)


def _count_extreme(a: int, observed: int, right_sorted: list[int], alternative: Alternative) -> int:
    """How many b in right_sorted make the pattern sum a + b at least as extreme as `observed`."""
    if alternative == "greater":  # a + b >= observed
        return len(right_sorted) - bisect.bisect_left(right_sorted, observed - a)
    if alternative == "less":  # a + b <= observed
        return bisect.bisect_right(right_sorted, observed - a)
    if observed == 0:  # |a + b| >= 0: every pattern
        return len(right_sorted)
    m = abs(observed)  # a + b >= m  or  a + b <= -m  (disjoint since m > 0)
    return (len(right_sorted) - bisect.bisect_left(right_sorted, m - a)) + bisect.bisect_right(right_sorted, -m - a)


def _is_extreme(s: int, observed: int, alternative: Alternative) -> bool:
    if alternative == "greater":
        return s >= observed
    if alternative == "less":
        return s <= observed
    return abs(s) >= abs(observed)


# ---------------------------------------------------------------------------------------------------------------------
# Wilcoxon signed-rank test
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WilcoxonResult:
    r_plus: float  # sum of the (mid-)ranks of |d| over positive d, zeros dropped
    r_minus: float
    n_used: int  # non-zero deltas
    has_ties: bool
    p_value: float


def midranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of `values` (ascending); tied values share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        rank = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[order[k]] = rank
        i = j + 1
    return ranks


def wilcoxon_signed_rank(deltas: Sequence[float], alternative: Alternative = "two-sided") -> WilcoxonResult:
    """Exact Wilcoxon signed-rank test (zeros dropped, mid-ranks for ties, exact conditional null of R+)."""
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be greater, less or two-sided, got {alternative!r}")
    for v in deltas:
        if not math.isfinite(v):
            raise ValueError(f"statistics need finite deltas, got {v!r}")
    nonzero = [v for v in deltas if v != 0]
    n = len(nonzero)
    if n == 0:
        return WilcoxonResult(0.0, 0.0, 0, False, 1.0)
    ranks = midranks([abs(v) for v in nonzero])
    doubled = [int(round(2 * r)) for r in ranks]  # mid-ranks are multiples of 1/2
    has_ties = len(set(doubled)) < n
    obs2 = sum(r2 for r2, v in zip(doubled, nonzero) if v > 0)
    total2 = sum(doubled)
    # null distribution of 2*R+ (each rank positive or negative with probability 1/2): counts by dynamic programming
    counts = [0] * (total2 + 1)
    counts[0] = 1
    top = 0
    for r2 in doubled:
        for s in range(top, -1, -1):
            if counts[s]:
                counts[s + r2] += counts[s]
        top += r2
    patterns = 2 ** n
    if alternative == "greater":
        hit = sum(counts[obs2:])
    elif alternative == "less":
        hit = sum(counts[: obs2 + 1])
    else:  # |2R+ - total2/2... | in doubled units: |2*s - total2| >= |2*obs2 - total2|
        dev = abs(2 * obs2 - total2)
        hit = sum(c for s, c in enumerate(counts) if c and abs(2 * s - total2) >= dev)
    r_plus = obs2 / 2
    return WilcoxonResult(r_plus, total2 / 2 - r_plus, n, has_ties, hit / patterns)


# ---------------------------------------------------------------------------------------------------------------------
# multiplicity
# ---------------------------------------------------------------------------------------------------------------------
def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: p_(i) -> max_{j<=i} min(1, (m-j+1) p_(j))."""
    m = len(p_values)
    for p in p_values:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-values must lie in [0, 1], got {p!r}")
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# ---------------------------------------------------------------------------------------------------------------------
# paired summary
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedStats:
    n: int
    deltas: tuple[float, ...]
    mean: float
    sd: float | None  # sample standard deviation (n - 1); None for n < 2
    se: float | None
    confidence: float
    ci_low: float | None  # mean -+ t_{n-1, (1+confidence)/2} * se; None for n < 2
    ci_high: float | None
    t: float | None  # None when undefined (n < 2, or sd = 0)
    df: int
    p_t_greater: float | None
    p_t_two_sided: float | None
    p_sign_flip_greater: float
    p_sign_flip_two_sided: float
    sign_flip_exact: bool
    wilcoxon_r_plus: float
    p_wilcoxon_greater: float
    p_wilcoxon_two_sided: float
    wins: int  # d > 0
    ties: int  # d == 0
    losses: int  # d < 0
    effect_size: float | None  # mean / sd

    def as_dict(self) -> dict:
        out = asdict(self)
        out["deltas"] = list(self.deltas)
        return out


def sample_sd(values: Sequence[float]) -> float | None:
    """Sample standard deviation (divisor n - 1); None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def paired_stats(deltas: Sequence[float], confidence: float = 0.95) -> PairedStats:
    """Every seed-check statistic of one candidate's paired deltas d_s = candidate_s - baseline_s."""
    d = [float(v) for v in deltas]
    if not d:
        raise ValueError("paired statistics need at least one delta")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    _as_integers(d)  # rejects non-finite values with a clear message
    n = len(d)
    mean = math.fsum(d) / n
    sd = se = lo = hi = t = p_g = p_2 = eff = None
    if n >= 2:
        sd = sample_sd(d)
        se = sd / math.sqrt(n)
        half = t_ppf(0.5 + confidence / 2, n - 1) * se
        lo, hi = mean - half, mean + half
        if sd > 0:
            t = mean / se
            p_g = t_sf(t, n - 1)
            p_2 = min(1.0, 2.0 * t_sf(abs(t), n - 1))
            eff = mean / sd
        else:  # every delta equal: the t statistic is undefined (0/0) or infinite
            p_g = 0.0 if mean > 0 else 1.0
            p_2 = 0.0 if mean != 0 else 1.0
    sf_g = sign_flip_test(d, "greater")
    sf_2 = sign_flip_test(d, "two-sided")
    w_g = wilcoxon_signed_rank(d, "greater")
    w_2 = wilcoxon_signed_rank(d, "two-sided")
    return PairedStats(
        n=n, deltas=tuple(d), mean=mean, sd=sd, se=se, confidence=confidence, ci_low=lo, ci_high=hi, t=t,
        df=n - 1, p_t_greater=p_g, p_t_two_sided=p_2,
        p_sign_flip_greater=sf_g.p_value, p_sign_flip_two_sided=sf_2.p_value, sign_flip_exact=sf_g.exact,
        wilcoxon_r_plus=w_g.r_plus, p_wilcoxon_greater=w_g.p_value, p_wilcoxon_two_sided=w_2.p_value,
        wins=sum(v > 0 for v in d), ties=sum(v == 0 for v in d), losses=sum(v < 0 for v in d), effect_size=eff,
    )


# ---------------------------------------------------------------------------------------------------------------------
# group-sequential boundary
# ---------------------------------------------------------------------------------------------------------------------
POCOCK_REPLICATES = 40_000


@functools.lru_cache(maxsize=64)
def pocock_t_level(looks: tuple[int, ...], alpha: float, replicates: int = POCOCK_REPLICATES, seed: int = 0) -> float:
    """The constant nominal one-sided level c of a Pocock-type boundary for the one-sample t statistic at the planned
    looks (cumulative numbers of paired deltas, ascending): under a true mean of zero and normal deltas, the chance
    that any look has t_sf(T_n, n - 1) <= c is `alpha`.

    The t statistic's null distribution does not depend on the SD, so the level is a constant of (looks, alpha); it
    is found by Monte Carlo (`replicates` null sequences from a fixed seed: the same inputs give the same level) and
    bisection on c. A futility or rejection stop only ends a sequence early without a claim, so it can only lower
    the error rate: the boundary is computed without them (non-binding stops). One look gives c = alpha exactly."""
    if not looks or any(n < 2 for n in looks) or list(looks) != sorted(set(looks)):
        raise ValueError(f"looks must be ascending counts >= 2, got {looks}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if len(looks) == 1:
        return alpha
    rng = random.Random(f"pocock/{seed}")
    t_paths = []
    for _ in range(replicates):
        s = ss = 0.0
        path = []
        i = 0
        for n in looks:
            while i < n:
                x = rng.gauss(0.0, 1.0)
                s += x
                ss += x * x
                i += 1
            var = (ss - s * s / n) / (n - 1)
            path.append(s / math.sqrt(var * n) if var > 0 else math.inf)
        t_paths.append(path)

    def crossing(c: float) -> float:
        crit = [t_ppf(1.0 - c, n - 1) for n in looks]
        return sum(any(t >= q for t, q in zip(path, crit)) for path in t_paths) / replicates

    lo, hi = alpha / len(looks), alpha  # Bonferroni over looks is valid (too strict); alpha per look is too loose
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if crossing(mid) > alpha:
            hi = mid
        else:
            lo = mid
    return lo
