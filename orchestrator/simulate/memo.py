"""Memoisation of the pure functions a simulation calls many times with the same arguments, for the length of a
simulation only (the patched attributes are restored on exit)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from orchestrator import planner, stats
from orchestrator.runkey import RunKey


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

