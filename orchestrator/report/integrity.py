"""The report's integrity checks: records that contradict each other, their runs' curves, the spec or the planner.
Each finding is a problem in the summary (and a line of `fsearch report --check`). A record's expected decision and
a stage's promotions are asked of orchestrator.decisions, the code that made them."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from orchestrator.decisions import SEEDCHECK, run_decision
from orchestrator.records import Record
from orchestrator.report.build import Context, is_baseline

FLOAT_REL_TOL = 1e-12  # records vs recomputation (the same float operations: equal up to JSON round trips)
FLOAT_ABS_TOL = 1e-15
MATCH_FIELDS = ("task", "stage", "seed", "batch_size", "budget_steps", "eval_every", "n_val", "data_seed")


def close(a: float | None, b: float | None) -> bool:
    """Equal up to a JSON round trip (None only equals None)."""
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=FLOAT_REL_TOL, abs_tol=FLOAT_ABS_TOL)


def check_records(ctx: Context) -> None:
    stage_seeds: dict[tuple[str, str], set[int]] = defaultdict(set)
    for rec in ctx.data.records:
        stage_seeds[(rec.task, rec.stage)].add(rec.seed)
    for rec in ctx.data.records:
        check_own_fields(ctx, rec)
        check_curve(ctx, rec)
        if not is_baseline(rec):
            seeds = ctx.spec_seeds(rec.stage) or stage_seeds[(rec.task, rec.stage)]
            check_pairing(ctx, rec, len(seeds))


def check_own_fields(ctx: Context, rec: Record) -> None:
    """A record agrees with itself: value is the final eval's, the original's best_* fields are its best eval's, and
    a baseline's or a failed run's decision is what its status says."""
    key, metric = rec.run_key, rec.metric
    final = rec.final.get("val_" + metric)
    if rec.status == "ok" and not close(rec.value, final):
        ctx.problem(f"record {key}: value {rec.value!r} is not final['val_{metric}'] = {final!r}", key)
    for orig, name in (("best_val_loss", "val_loss"), ("best_val_tok_acc", "val_tok_acc")):
        if rec.status == "ok" and name in rec.best and not close(getattr(rec, orig), rec.best.get(name)):
            ctx.problem(f"record {key}: {orig} {getattr(rec, orig)!r} is not best['{name}'] {rec.best.get(name)!r}",
                        key)
    if rec.status != "ok" or is_baseline(rec):
        expect = run_decision(is_baseline(rec), rec.status, rec.stage, 1, None, None)
        if rec.decision != expect:
            ctx.problem(f"record {key}: decision {rec.decision!r} but status {rec.status!r} "
                        f"({'baseline' if is_baseline(rec) else 'candidate'}) means {expect!r}", key)


def check_pairing(ctx: Context, rec: Record, n_seeds: int) -> None:
    """A candidate record names a matched baseline that exists, is a baseline of the same configuration, and the
    record's baseline value, delta and decision are what that baseline gives."""
    key, base_key = rec.run_key, rec.baseline_key
    if not base_key:
        ctx.problem(f"record {key}: a candidate run without baseline_key", key)
        return
    base = ctx.by_key.get(base_key)
    if base is None:
        ctx.problem(f"missing record {base_key}: the matched baseline of {key} is not in records.jsonl", key, base_key)
        return
    if not is_baseline(base):
        ctx.problem(f"record {key}: baseline_key {base_key} is not a baseline run", key, base_key)
    for f in MATCH_FIELDS:
        if getattr(rec, f) != getattr(base, f):
            ctx.problem(f"record {key}: its baseline {base_key} differs in {f} ({getattr(rec, f)!r} vs "
                        f"{getattr(base, f)!r}): not a matched comparison", key, base_key)
    base_value = base.value if base.status == "ok" else None
    if rec.status != "ok":
        return
    if not close(rec.baseline_value, base_value):
        ctx.problem(f"record {key}: baseline_value {rec.baseline_value!r} but its baseline {base_key} has value "
                    f"{base_value!r}", key, base_key)
    delta = None if base_value is None or rec.value is None else rec.value - base_value
    if not close(rec.delta, delta):
        ctx.problem(f"record {key}: delta {rec.delta!r} but value - baseline value = {delta!r} (baseline {base_key})",
                    key, base_key)
    expect = run_decision(False, rec.status, rec.stage, n_seeds, delta, rec.threshold)
    if rec.decision != expect:
        ctx.problem(f"record {key}: decision {rec.decision!r} but delta {delta!r} and threshold {rec.threshold!r} "
                    f"give {expect!r}", key)


def check_curve(ctx: Context, rec: Record) -> None:
    """The record's value is its run's final evaluation in metrics.jsonl (when the file is there)."""
    rows = ctx.data.curves.get(rec.run_key)
    if not rows or rec.status != "ok":
        return
    final_rows = [r for r in rows if r.get("step") == rec.steps]
    name = "val_" + rec.metric
    if final_rows and name in final_rows[-1] and not close(final_rows[-1][name], rec.value):
        ctx.problem(f"record {rec.run_key}: value {rec.value!r} but its metrics.jsonl has {name} = "
                    f"{final_rows[-1][name]!r} at step {rec.steps}", rec.run_key)


def check_promotions(ctx: Context, label: str, stages: dict[str, Any]) -> None:
    """A candidate reaches a stage only if the screening stage before it promoted it (the planner's rule)."""
    screen = [n for n in ("quick", "med") if n in stages]
    for stage, st in stages.items():
        prev = {"med": "quick", "long": "med", SEEDCHECK: screen[-1] if screen else None}.get(stage)
        if prev is None or prev not in stages:
            continue
        for name, cand in st["candidates"].items():
            before = stages[prev]["candidates"].get(name)
            if before is None or before["stage_decision"] != "promote":
                why = "it has no record there" if before is None else (
                    f"the rule says {before['stage_decision']} (mean delta {before['mean_delta']!r})")
                ctx.problem(f"task {label}: {name} ran at {stage} but was not promoted at {prev}: {why}",
                            *cand["sources"])
    spec = ctx.data.spec
    if SEEDCHECK in stages and spec is not None and spec.stages.seedcheck is not None:
        sc = spec.stages.seedcheck
        names = list(stages[SEEDCHECK]["candidates"])
        controls = [n for n in names if spec.is_control(label, n)]
        # controls have a finalist quota of their own (max_controls); FS candidates fill max_finalists
        for kind, count, limit, quota in (("FS", len(names) - len(controls), sc.max_finalists, "max_finalists"),
                                          ("control", len(controls), sc.max_controls, "max_controls")):
            if count > limit:
                ctx.problem(f"task {label}: {count} {kind} finalists at {SEEDCHECK}, the spec allows {limit} "
                            f"(seedcheck.{quota})")


def planner_task_status(state: Any) -> str:
    """A planner TaskState in words."""
    if state.status == "running":
        return f"running (stage {state.stage})" if state.stage else "waiting"
    if state.status == "failed":
        return f"failed: {state.reason}"
    if state.status == "needs_probe":
        return "needs batch probe"
    return "done" + (f" ({state.reason})" if state.reason else "")


def check_against_planner(ctx: Context, tasks: dict[str, Any]) -> None:
    """The planner decides promotions and task states from the same records through the same decision code: its
    decisions must be the summary's, exactly, and every record must be a run of the spec."""
    if ctx.data.spec is None:
        return
    from orchestrator.planner import plan
    from orchestrator.progress import probed_batch_sizes

    try:
        p = plan(ctx.data.spec, ctx.data.records, batch_sizes=probed_batch_sizes(ctx.data.round_dir))
    except Exception as e:  # noqa: BLE001 - a planner that cannot read the records is itself a finding
        ctx.problem(f"planner: cannot plan from these records ({type(e).__name__}: {e})")
        return
    for key in p.unused_records:
        ctx.problem(f"record {key}: not a run of the current spec.yaml (an earlier version of the spec?)", key)
    for label, state in p.tasks.items():
        if label in tasks:
            tasks[label]["status"] = planner_task_status(state)
            tasks[label]["planner_candidates"] = {name: {"status": cs.status, "reached": cs.reached,
                                                         "reason": cs.reason} for name, cs in state.candidates.items()}
    for d in p.decisions:
        if d.decision not in ("promote", "prune"):
            continue
        mine = tasks.get(d.task, {}).get("stages", {}).get(d.stage, {}).get("candidates", {}).get(d.candidate)
        if mine is None:
            ctx.problem(f"task {d.task}: the planner decided {d.decision} for {d.candidate} at {d.stage}, which has "
                        f"no records here")
        elif mine["stage_decision"] != d.decision or mine["mean_delta"] != d.mean_delta:
            ctx.problem(f"task {d.task}: {d.candidate} at {d.stage}: the planner says {d.decision} (mean delta "
                        f"{d.mean_delta!r}), the records give {mine['stage_decision']} (mean delta "
                        f"{mine['mean_delta']!r})", *mine["sources"])
