"""The stage walkers of the planner: one task's threshold-rule (or fixed) stage, successive-halving stage and sequential
seed check, and the calibration of a threshold in baseline SDs, each given the task's planner (orchestrator.planner,
whose docstring states the rules). A walker adds the stage's runnable units, status row and decisions to the plan
and returns {candidate: (decision, mean delta)} once the stage is complete, None while it runs or when the task
failed. Pure, like the planner: records in, units and decisions out.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from model.candidates import BASELINE, Candidate
from orchestrator.decisions import HalvingRule, is_gate, screen, worst_value
from orchestrator.spec import ThresholdSD
from orchestrator.stats import sample_sd

if TYPE_CHECKING:  # the planner imports this module; the walkers only receive its task planner
    from orchestrator.planner import _TaskPlanner


# ---------------------------------------------------------------------------------------------------------------
# reading a record (a Record object or a dict)
def record_field(record: Any, name: str) -> Any:
    if record is None:
        return None
    if type(record) is dict:  # the common case, without the abstract Mapping check
        return record.get(name)
    return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)


def record_failure(record: Any) -> str | None:
    """Why a record is not a usable result (None if it is one)."""
    if type(record) is dict and "_failure" in record:  # the planner's own note (see planner._index)
        return record["_failure"]
    return failure_reason(record)


def failure_reason(record: Any) -> str | None:
    status = record_field(record, "status")
    if status == "ok":
        v = record_field(record, "value")
        if isinstance(v, (int, float)) and math.isfinite(v):
            return None
        return f"no value for metric {record_field(record, 'metric')!r}"
    if status == "diverged":
        return "diverged (non-finite loss)"
    kind, msg = record_field(record, "error_kind"), record_field(record, "error_message")
    return f"{status}" + (f" ({kind})" if kind else "") + (f": {msg}" if msg else "")


# ---------------------------------------------------------------------------------------------------------------
# a threshold-rule stage, a fixed seed check, long
def walk_stage(tp: _TaskPlanner, name: str, seeds: list[int], members: list[Candidate]) \
        -> dict[str, tuple[str, float | None]] | None:
    """Units and decisions of one stage. Returns {candidate: (decision, mean delta)} when the stage is complete,
    None while it is running or when its baseline failed (then the task is failed)."""
    seeds = sorted(seeds)
    row = tp.stage_row(name)
    gate = is_gate(name)
    baselines = {s: tp.unit(BASELINE, name, s) for s in seeds}
    base_rec = {s: tp.record(u) for s, u in baselines.items()}
    units = {(c.name, s): tp.unit(c, name, s) for c in members for s in seeds}
    recs = {k: tp.record(u) for k, u in units.items()}
    row.total = len(baselines) + len(units)
    row.done = sum(r is not None for r in (*base_rec.values(), *recs.values()))
    row.failed = sum(r is not None and record_failure(r) is not None for r in (*base_rec.values(), *recs.values()))

    # Only runs that every completion order needs are emitted, so that several workers run the serial round's
    # runs: every baseline of the stage runs (a failed one fails the task once all have records, whichever
    # finished first) and no candidate starts before they are all ok; a failed candidate seed prunes it at a
    # gate and skips its later seeds, so there a candidate's seeds run one after another.
    missing_base = [baselines[s] for s in seeds if base_rec[s] is None]
    if missing_base:
        tp.out.runnable += missing_base
        return None
    for s in seeds:
        if (why := record_failure(base_rec[s])) is not None:
            row.state = "failed"
            tp._fail(f"baseline failed at {name} seed {s}: {why}")
            return None
    missing = []
    for c in members:
        for s in seeds:
            rec = recs[(c.name, s)]
            if rec is None:
                missing.append(units[(c.name, s)])
            if gate and (rec is None or record_failure(rec) is not None):
                break
    if missing:
        tp.out.runnable += missing
        return None

    row.state = "complete"
    outcome: dict[str, tuple[str, float | None]] = {}
    for c in members:
        deltas: dict[int, float | None] = {}
        failure = None
        for s in seeds:
            r = recs[(c.name, s)]
            why = record_failure(r) if r is not None else "skipped after an earlier failure"
            if why is not None:
                deltas[s] = None
                failure = failure or f"seed {s}: {why}"
            else:
                deltas[s] = record_field(r, "value") - record_field(base_rec[s], "value")
        judged = screen(name, seeds, deltas, failure, tp.threshold)
        # the planner's stage decisions say "recorded" for every stage that does not screen
        decision = judged.decision if gate else "recorded"
        mean, reason = judged.mean_delta, judged.reason
        if decision == "promote" and tp.chance_tie([recs[(c.name, s)] for s in seeds],
                                                     [base_rec[s] for s in seeds]):
            decision, reason = "prune", f"{name} tie at chance level ({tp.chance:g}): no evidence"
        tp.state.candidates[c.name].deltas[name] = mean
        if decision == "prune":
            row.pruned += 1
            tp._set(c.name, "pruned", f"pruned at {reason}")
        elif decision == "promote":
            row.promoted += 1
        outcome[c.name] = (decision, mean)
        tp.add_decision(name, c.name, decision, deltas, mean, reason)  # type: ignore[arg-type]
    return outcome



# ---------------------------------------------------------------------------------------------------------------
# the threshold in baseline SDs
def calibrate(tp: _TaskPlanner) -> bool:
    """Measure a `threshold: {sd: x}` on the first stage's first calibration seeds (their baseline runs are the
    matched baselines of those seeds too). True when the threshold is known; False while running or failed."""
    th = tp.task.threshold
    assert isinstance(th, ThresholdSD)
    name, st = tp.spec.stage_list()[0]
    seeds = list(st.seeds)[:th.calibration_seeds]
    units = [tp.unit(BASELINE, name, s) for s in seeds]
    recs = [tp.record(u) for u in units]
    if any(r is None for r in recs):
        tp.state.stage = name
        tp.out.runnable += [u for u, r in zip(units, recs) if r is None]
        return False
    values = [record_field(r, "value") for r in recs if record_failure(r) is None]
    sd = sample_sd(values)
    if sd is None:
        tp._fail(f"threshold calibration: {len(values)} of {len(seeds)} {name} baseline seed(s) finished; "
                 f"the SD needs two")
        return False
    tp.threshold = tp.state.threshold = th.sd * sd
    tp.state.calibration = (f"threshold {th.sd:g} x baseline SD {sd:.4g} = {tp.threshold:.4g} "
                            f"({name} baseline, seeds {', '.join(map(str, seeds))})")
    return True



# ---------------------------------------------------------------------------------------------------------------
# the successive-halving screen
def walk_halving(tp: _TaskPlanner, name: str, st: Any, members: list[Candidate]) \
        -> dict[str, tuple[str, float | None]] | None:
    """A halving stage rung by rung (synchronous: a rung is decided once every run of it has a record). A
    baseline seed that failed for good removes that seed's pair for every candidate (said in the reasons); a
    failed or diverged candidate seed counts as the metric's worst value."""
    seeds = sorted(st.seeds)
    sizes = st.screen.rung_sizes(len(seeds))
    rule = HalvingRule(st.screen.keep, st.screen.drop_p)
    row = tp.stage_row(name, total=0)
    base = {s: tp.unit(BASELINE, name, s) for s in seeds}
    base_rec = {s: tp.record(u) for s, u in base.items()}
    alive = list(members)
    outcome: dict[str, tuple[str, float | None]] = {}
    for r, size in enumerate(sizes):
        if not alive:  # every candidate is out: the later rungs need no runs, not even baselines
            break
        rung = seeds[:size]
        removed = [s for s in rung if base_rec[s] is not None and record_failure(base_rec[s]) is not None]
        ok = [s for s in rung if s not in removed]
        units = {(c.name, s): tp.unit(c, name, s) for c in alive for s in ok}
        recs = {k: tp.record(u) for k, u in units.items()}
        row.total = len(rung) + sum(len(ok) for _ in alive) if r == len(sizes) - 1 else row.total
        row.done = sum(x is not None for x in (*base_rec.values(), *recs.values()))
        row.failed = sum(x is not None and record_failure(x) is not None
                         for x in (*base_rec.values(), *recs.values()))
        missing_base = [base[s] for s in ok if base_rec[s] is None]
        missing = [u for k, u in units.items() if recs[k] is None and base_rec[u.seed] is not None]
        if missing_base or missing:
            row.total = max(row.total or 0, len(rung) + len(units))
            tp.out.runnable += missing_base + missing
            return None
        if not ok:
            row.state = "failed"
            tp._fail(f"every baseline seed of {name} rung {r + 1} failed: {record_failure(base_rec[removed[0]])}")
            return None
        deltas, worst_seeds, worst = _rung_deltas(tp, alive, ok, recs, base_rec)
        ties = frozenset(c.name for c in alive if not worst_seeds[c.name] and tp.chance_tie(
            [recs[(c.name, s)] for s in ok], [base_rec[s] for s in ok]))
        last = r == len(sizes) - 1
        judged = {}
        fs_group = [c for c in alive if c.name not in tp.controls]
        for group in (fs_group, [c for c in alive if c.name in tp.controls]):
            if group:  # FS candidates and controls are halved apart: a control never takes an FS candidate's place
                judged.update(rule.rung(name, {c.name: list(deltas[c.name].values()) for c in group},
                                        tp.threshold, last, ties))
        note = f"; baseline seed(s) {', '.join(map(str, removed))} failed: pair(s) removed" if removed else ""
        kept = []
        for c in alive:
            j = judged[c.name]
            worst_note = (f"; seed(s) {', '.join(map(str, worst_seeds[c.name]))} failed or diverged: counted as "
                          f"the worst value {worst:g}") if worst_seeds[c.name] else ""
            reason = f"{j.reason} (rung {r + 1} of {len(sizes)}){worst_note}{note}"
            if j.decision == "promote" and not last:
                kept.append(c)
                continue
            decision = "promote" if j.decision == "promote" else "prune"
            tp.state.candidates[c.name].deltas[name] = j.mean_delta
            if decision == "prune":
                row.pruned += 1
                tp._set(c.name, "pruned", f"pruned at {reason}")
            else:
                row.promoted += 1
            outcome[c.name] = (decision, j.mean_delta)
            tp.add_decision(name, c.name, decision, dict(deltas[c.name]), j.mean_delta, reason,
                            removed_pairs=removed, worst_seeds=worst_seeds[c.name])
        alive = kept
    row.state = "complete"
    return {c.name: outcome[c.name] for c in members}


def _rung_deltas(tp: _TaskPlanner, alive: list[Candidate], ok: list[int], recs: Mapping[tuple[str, int], Any],
                 base_rec: Mapping[int, Any]) -> tuple[dict[str, dict[int, float]], dict[str, list[int]], float]:
    """One halving rung's paired deltas per candidate over the seeds with an ok baseline, the candidate seeds that
    failed or diverged (each counted as the metric's worst value seen in the rung) and that worst value."""
    observed = [record_field(base_rec[s], "value") for s in ok] + \
        [record_field(x, "value") for x in recs.values() if record_failure(x) is None]
    worst = worst_value(tp.task.metric or "", observed)
    deltas: dict[str, dict[int, float]] = {}
    worst_seeds: dict[str, list[int]] = {}
    for c in alive:
        deltas[c.name], worst_seeds[c.name] = {}, []
        for s in ok:
            rec = recs[(c.name, s)]
            v = record_field(rec, "value") if record_failure(rec) is None else worst
            if record_failure(rec) is not None:
                worst_seeds[c.name].append(s)
            deltas[c.name][s] = v - record_field(base_rec[s], "value")
    return deltas, worst_seeds, worst


# ---------------------------------------------------------------------------------------------------------------
# the sequential seed check
def check_value(rec: Any, metric: str) -> float | None:
    """A seed-check record's decision value: its held-out test metric (or validation, `decide_on: val`)."""
    if record_failure(rec) is not None:
        return None
    if metric == "val":
        return record_field(rec, "value")
    v = (record_field(rec, "test") or {}).get(f"test_{record_field(rec, 'metric')}")
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None



def walk_sequential(tp: _TaskPlanner, name: str, st: Any, finalists: list[Candidate]) \
        -> dict[str, tuple[str, float | None]] | None:
    """The sequential seed check: looks of paired fresh seeds, every finalist on the same seeds, until each is
    confirmed, rejected or stopped (see orchestrator.decisions.SequentialCheckRule)."""
    row = tp.stage_row(name, total=0)
    metric = st.decide_on or "test"
    pool = list(st.seeds)
    base = {s: tp.unit(BASELINE, name, s) for s in pool}
    base_rec = {s: tp.record(u) for s, u in base.items()}
    active = list(finalists)
    done: dict[str, tuple[Any, dict[int, float], dict[int, float | None], list[int], list[int]]] = {}
    for look in st.looks:
        use: list[int] = []
        removed: list[int] = []
        for s in pool:
            if len(use) == look:
                break
            if base_rec[s] is not None and check_value(base_rec[s], metric) is None:
                removed.append(s)
            else:
                use.append(s)
        units = {(c.name, s): tp.unit(c, name, s) for c in active for s in use}
        recs = {k: tp.record(u) for k, u in units.items()}
        row.total = max(row.total or 0, len(use) + len(removed) + len(units))
        row.done = sum(x is not None for x in (*base_rec.values(), *recs.values()))
        missing_base = [base[s] for s in use if base_rec[s] is None]
        missing = [u for k, u in units.items() if recs[k] is None and base_rec[u.seed] is not None]
        if missing_base or missing:
            tp.out.runnable += missing_base + missing
            return None
        observed = [check_value(base_rec[s], metric) for s in use] + \
            [v for x in recs.values() if (v := check_value(x, metric)) is not None]
        worst = worst_value(tp.task.metric or "", observed)  # type: ignore[arg-type]
        still = []
        for c in active:
            deltas: dict[int, float] = {}
            val: dict[int, float | None] = {}
            worst_seeds = []
            for s in use:
                rec = recs[(c.name, s)]
                v = check_value(rec, metric)
                if v is None:
                    v = worst
                    worst_seeds.append(s)
                deltas[s] = v - check_value(base_rec[s], metric)  # type: ignore[operator]
                bv, cv = record_field(base_rec[s], "value"), record_field(rec, "value")
                val[s] = cv - bv if record_failure(rec) is None and bv is not None and cv is not None else None
            rule = tp.sequential_rule(st, c.name in tp.controls)
            if len(use) < look:
                lab = rule.decide(list(deltas.values()), tp.threshold)
                lab = type(lab)("inconclusive", f"only {len(use)} paired seeds left after failed baselines; look "
                                f"{st.looks.index(look) + 1} needs {look}", lab.n, lab.mean, lab.p_greater,
                                lab.level)
            else:
                lab = rule.decide(list(deltas.values()), tp.threshold)
            if lab.label == "continue":
                still.append(c)
            else:
                done[c.name] = (lab, deltas, val, list(removed), worst_seeds)
        active = still
        if not active:
            break
    row.state = "complete"
    outcome: dict[str, tuple[str, float | None]] = {}
    for c in finalists:
        lab, deltas, val, removed, worst_seeds = done[c.name]
        reason = lab.reason
        if worst_seeds:
            reason += f"; seed(s) {', '.join(map(str, worst_seeds))} failed or diverged: counted as the worst value"
        if removed:
            reason += f"; baseline seed(s) {', '.join(map(str, removed))} failed: pair(s) removed"
        tp.state.candidates[c.name].deltas[name] = lab.mean
        outcome[c.name] = ("recorded", lab.mean)
        tp.add_decision(name, c.name, "recorded", dict(deltas), lab.mean, reason, label=lab.label, metric=metric,
                        val_deltas=val, removed_pairs=removed, worst_seeds=worst_seeds, p_value=lab.p_greater,
                        level=lab.level)
    return outcome
