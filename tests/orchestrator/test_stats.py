"""orchestrator.stats against scipy (the oracle) and against brute force written here independently."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats as ss

from orchestrator import stats
from orchestrator.decisions import SeedCheckRule
from orchestrator.stats import holm, paired_stats, sign_flip_test, t_cdf, t_ppf, t_sf, wilcoxon_signed_rank

REL = 1e-9


def close(a: float, b: float, rel: float = REL, abs_: float = 1e-13) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


# --- t distribution ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 9, 11, 20, 30, 50, 200])
def test_t_quantile_and_tails_match_scipy(df):
    for p in [1e-6, 0.001, 0.0125, 0.025, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.975, 0.9875, 0.999, 1 - 1e-6]:
        assert close(t_ppf(p, df), ss.t.ppf(p, df), rel=1e-10, abs_=1e-12), (p, df)
    for x in [-30.0, -4.0, -2.1, -0.5, 0.0, 0.3, 1.0, 2.776, 5.0, 12.0, 60.0]:
        assert close(t_sf(x, df), ss.t.sf(x, df), rel=1e-10, abs_=1e-300), (x, df)
        assert close(t_cdf(x, df), ss.t.cdf(x, df), rel=1e-10, abs_=1e-300), (x, df)


def test_t_quantile_edges():
    assert t_ppf(0.5, 4) == 0.0
    assert t_ppf(1.0, 4) == math.inf and t_ppf(0.0, 4) == -math.inf
    assert t_ppf(0.25, 6) == -t_ppf(0.75, 6)
    with pytest.raises(ValueError):
        t_ppf(1.5, 3)


# --- independent brute force ---------------------------------------------------------------------------------------
def brute_sign_flip(d, alternative):
    exact = [Fraction(v) for v in d]
    obs = sum(exact)
    hits = 0
    for signs in itertools.product((1, -1), repeat=len(exact)):
        s = sum(e * x for e, x in zip(signs, exact))
        hits += s >= obs if alternative == "greater" else s <= obs if alternative == "less" else abs(s) >= abs(obs)
    return Fraction(hits, 2 ** len(exact))


def brute_wilcoxon(d, alternative):
    nz = [v for v in d if v != 0]
    ranks = ss.rankdata([abs(v) for v in nz])  # average ranks for ties
    obs = sum(r for r, v in zip(ranks, nz) if v > 0)
    centre = sum(ranks) / 2
    hits = 0
    for signs in itertools.product((True, False), repeat=len(nz)):
        s = sum(r for r, pos in zip(ranks, signs) if pos)
        if alternative == "greater":
            hits += s >= obs - 1e-9
        elif alternative == "less":
            hits += s <= obs + 1e-9
        else:
            hits += abs(s - centre) >= abs(obs - centre) - 1e-9
    return hits / 2 ** len(nz)


def random_pairs(rng, n):
    base = rng.normal(0.5, 0.1, n)
    cand = base + rng.normal(rng.choice([0.0, 0.02, 0.05]), 0.03, n)
    return cand, base


# --- paired statistics vs scipy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", range(3, 13))
def test_paired_stats_match_scipy_on_random_pairs(n):
    rng = np.random.default_rng(1000 + n)
    for _ in range(6 if n <= 10 else 3):
        cand, base = random_pairs(rng, n)
        d = [float(c) - float(b) for c, b in zip(cand, base)]
        s = paired_stats(d)
        two = ss.ttest_rel(cand, base)
        greater = ss.ttest_rel(cand, base, alternative="greater")
        ci = two.confidence_interval(0.95)
        assert close(s.mean, float(np.mean(d)))
        assert close(s.sd, float(np.std(d, ddof=1)))
        assert close(s.t, float(two.statistic), rel=1e-9)
        assert close(s.p_t_two_sided, float(two.pvalue), rel=1e-8)
        assert close(s.p_t_greater, float(greater.pvalue), rel=1e-8)
        assert close(s.ci_low, float(ci.low), rel=1e-9) and close(s.ci_high, float(ci.high), rel=1e-9)
        # Wilcoxon: continuous data has no ties, so scipy's 'exact' null distribution applies
        for alt, mine in (("greater", s.p_wilcoxon_greater), ("two-sided", s.p_wilcoxon_two_sided)):
            ref = ss.wilcoxon(cand, base, method="exact", alternative=alt)
            assert close(mine, float(ref.pvalue), rel=1e-12), (alt, d)
        assert s.wilcoxon_r_plus == float(ss.wilcoxon(cand, base, method="exact", alternative="greater").statistic)
        # sign flip: exact, equal to brute force and to scipy's permutation test (exact for 2^n <= n_resamples)
        assert s.sign_flip_exact
        assert s.p_sign_flip_greater == brute_sign_flip(d, "greater")
        assert s.p_sign_flip_two_sided == brute_sign_flip(d, "two-sided")
        ref = ss.permutation_test((np.array(d),), np.sum, permutation_type="samples", alternative="greater",
                                  n_resamples=10 ** 5)
        assert close(s.p_sign_flip_greater, float(ref.pvalue), rel=1e-12)


@pytest.mark.parametrize("n", range(3, 13))
def test_ties_and_zeros(n):
    rng = np.random.default_rng(n)
    for _ in range(6 if n <= 9 else 2):  # the scipy oracle enumerates 2^n patterns per call: keep large n few
        d = [float(v) / 4 for v in rng.integers(-2, 5, n)]  # many ties and zeros
        if all(v == 0 for v in d):
            continue
        for alt in ("greater", "less", "two-sided"):
            assert sign_flip_test(d, alt).p_value == brute_sign_flip(d, alt), (alt, d)
            w = wilcoxon_signed_rank(d, alt)
            assert close(w.p_value, brute_wilcoxon(d, alt), rel=1e-12), (alt, d)
            # scipy's 'auto' method with ties/zeros and n <= 13: an exact permutation over all sign patterns
            # (slow in scipy: its oracle is asked up to n = 10, the brute force above covers every n)
            if n <= 10:
                ref = ss.wilcoxon(d, alternative=alt, zero_method="wilcox", method="auto")
                assert close(w.p_value, float(ref.pvalue), rel=1e-9), (alt, d)


def test_float_ties_between_sign_patterns_are_exact():
    # 0.1 + 0.2 != 0.3 in floating point: the test treats the given floats exactly, as brute force with Fractions does
    d = [0.1, 0.2, -0.3, 0.3]
    for alt in ("greater", "less", "two-sided"):
        assert sign_flip_test(d, alt).p_value == brute_sign_flip(d, alt)


def test_sign_flip_exact_values_small_n():
    for n in range(1, 13):
        d = [0.01 * (i + 1) for i in range(n)]  # all positive: only the observed pattern is as large
        r = sign_flip_test(d, "greater")
        assert r.exact and r.patterns == 2 ** n
        assert r.p_value == 2.0 ** -n
        assert sign_flip_test(d, "two-sided").p_value == 2.0 ** (1 - n)
        assert sign_flip_test([-x for x in d], "less").p_value == 2.0 ** -n
    # p * 2^n is an integer: exact counting, not estimation
    rng = np.random.default_rng(7)
    for n in range(3, 13):
        p = sign_flip_test(list(rng.normal(0, 1, n)), "two-sided").p_value
        assert (p * 2 ** n).is_integer()


def test_sign_flip_exact_beyond_12():
    rng = np.random.default_rng(3)
    d = [float(x) for x in rng.normal(0.3, 1.0, 15)]
    ints = stats._as_integers(d)
    obs = sum(ints)
    hits = sum(sum(e * v for e, v in zip(signs, ints)) >= obs for signs in itertools.product((1, -1), repeat=15))
    assert sign_flip_test(d, "greater").p_value == hits / 2 ** 15


def test_sign_flip_monte_carlo_above_exact_limit(monkeypatch):
    rng = np.random.default_rng(11)
    d = [float(x) for x in rng.normal(0.2, 1.0, 10)]
    exact = sign_flip_test(d, "greater").p_value
    monkeypatch.setattr(stats, "SIGN_FLIP_EXACT_MAX_N", 8)
    mc = sign_flip_test(d, "greater")
    assert not mc.exact and mc.patterns == stats.SIGN_FLIP_MC_DRAWS
    assert abs(mc.p_value - exact) < 0.006  # 100k draws: SE <= 0.0016
    assert sign_flip_test(d, "greater").p_value == mc.p_value  # fixed seed: reproducible


def test_non_finite_deltas_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        paired_stats([0.1, math.nan, 0.2])
    with pytest.raises(ValueError, match="finite"):
        wilcoxon_signed_rank([0.1, math.inf])


def test_constant_and_tiny_samples():
    s = paired_stats([0.02, 0.02, 0.02, 0.02, 0.02])
    assert s.sd == 0 and s.t is None and s.ci_low == s.ci_high == pytest.approx(0.02)
    assert s.p_t_two_sided == 0.0 and s.p_sign_flip_greater == 1 / 32
    one = paired_stats([0.5])
    assert one.ci_low is None and one.sd is None and one.p_t_two_sided is None
    zeros = paired_stats([0.0, 0.0, 0.0])
    assert zeros.p_wilcoxon_two_sided == 1.0 and zeros.p_sign_flip_two_sided == 1.0


# --- Holm ----------------------------------------------------------------------------------------------------------
def test_holm_hand_example():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([0.02]) == [0.02]
    assert holm([]) == []


def test_holm_matches_step_down_definition():
    rng = np.random.default_rng(5)
    alpha = 0.05
    for _ in range(200):
        m = int(rng.integers(1, 7))
        p = [float(x) for x in rng.uniform(0, 0.06, m)]
        adj = holm(p)
        # reject set by the textbook step-down procedure
        order = sorted(range(m), key=lambda i: p[i])
        rejected = set()
        for k, i in enumerate(order):
            if p[i] <= alpha / (m - k):
                rejected.add(i)
            else:
                break
        assert {i for i in range(m) if adj[i] <= alpha} == rejected
        assert all(a >= b for a, b in zip(adj, p))


# --- decision rule -------------------------------------------------------------------------------------------------
def test_decision_rule():
    rule = SeedCheckRule()
    good = paired_stats([0.03, 0.05, 0.04, 0.06, 0.045])
    p = rule.holm_family([good])[0]
    assert rule.decide(good, 0.01, p)[0] == "confirmed"
    # same deltas but a threshold above the mean: no longer confirmed; interval above threshold? no -> inconclusive
    assert rule.decide(good, 0.047, p)[0] == "inconclusive"
    # one negative seed out of 5: the one-sided sign-flip veto (p >= 2/32) blocks confirmation
    mixed = paired_stats([0.05, 0.06, 0.07, 0.08, -0.001])
    label, why = rule.decide(mixed, 0.0, rule.holm_family([mixed])[0])
    assert label == "inconclusive" and "sign-flip" in why
    bad = paired_stats([-0.03, -0.02, -0.04, -0.01, -0.025])
    assert rule.decide(bad, 0.0, 1.0)[0] == "rejected"
    assert rule.decide(paired_stats([0.1]), 0.0, 1.0)[0] == "inconclusive"
    assert rule.decide(None, 0.0, 1.0)[0] == "inconclusive"
    # Holm across a family: the same strong candidate among many weak ones needs p_t * m < alpha
    family = [good] + [paired_stats([0.01, -0.01, 0.02, -0.02, 0.0])] * 5
    adj = rule.holm_family(family)
    assert adj[0] == pytest.approx(min(1.0, 6 * good.p_t_two_sided))
    assert rule.min_seeds_for_sign_flip() == 5
    assert "m = 6" in rule.text(6)
