"""The report's summary: every number of the report, with the run keys it comes from, derived from the round's
typed records (and its spec). Decisions are not worked out here: stage decisions come from
orchestrator.decisions.screen and seed-check decisions from orchestrator.decisions.SeedCheckRule, the same code the
planner and the simulator call. The summary is plain JSON data (it is summary.json)."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from orchestrator.decisions import SEEDCHECK, SeedCheckRule, is_gate, screen, stage_rank
from orchestrator.records import Record
from orchestrator.report.load import RoundData
from orchestrator.stats import paired_stats, sample_sd

SUMMARY_SCHEMA = 1
RECORD_FIELDS = ("task", "stage", "candidate", "mode", "seed", "status", "error_kind", "metric", "value",
                 "baseline_key", "baseline_value", "delta", "threshold", "decision", "steps", "budget_steps",
                 "eval_every", "n_val", "data_seed", "batch_size", "micro_batch", "wall_s")
# what makes two runs "one configuration" for the repeats check
CONFIGURATION_FIELDS = ("task", "candidate", "mode", "seed", "budget_steps", "eval_every", "batch_size",
                        "micro_batch", "n_val", "data_seed", "metric", "device")
SEEDCHECK_LABELS = ("confirmed", "inconclusive", "rejected")
# the conditions a run's record states; runs of one (task, stage, candidate, seed) that differ in them, or in their
# run key, are different measurements and are never pooled
CONDITION_FIELDS = ("budget_steps", "eval_every", "batch_size", "n_val", "data_seed")


def seed_key(seed: int) -> str:
    return f"s{seed}"


def is_baseline(rec: Record) -> bool:
    return rec.mode == "baseline"


@dataclass
class Context:
    """What the summary's functions share: the round, the rule, records by run key and the problems found."""

    data: RoundData
    rule: SeedCheckRule
    by_key: dict[str, Record] = field(default_factory=dict)
    problems: list[dict[str, Any]] = field(default_factory=list)
    # run keys of the current spec's runs (None without a readable spec): what a stage's summary pools
    current_keys: set[str] | None = None
    set_aside: list[Record] = field(default_factory=list)  # runs of other conditions, shown apart, never pooled
    # the planner's stage decisions, (task, stage, candidate) -> StageDecision: the decisions the round acted on
    planned: dict[tuple[str, str, str], Any] = field(default_factory=dict)

    def problem(self, message: str, *run_keys: str | None) -> None:
        self.problems.append({"message": message, "run_keys": [k for k in run_keys if k]})

    def baseline_of(self, rec: Record) -> Record | None:
        return self.by_key.get(rec.baseline_key or "")

    def spec_seeds(self, stage: str) -> list[int] | None:
        if self.data.spec is None:
            return None
        try:
            return list(self.data.spec.stage(stage).seeds)
        except KeyError:
            return None


def build_summary(data: RoundData, rule: SeedCheckRule | None = None) -> dict[str, Any]:
    """Everything the report says, as plain JSON data, derived from the round's records."""
    from orchestrator.report.integrity import check_against_planner, check_records
    from orchestrator.report.plots import plot_list

    ctx = Context(data, rule or SeedCheckRule())
    for rec in data.records:
        if rec.run_key in ctx.by_key:
            ctx.problem(f"record {rec.run_key}: appears twice in records.jsonl", rec.run_key)
        ctx.by_key[rec.run_key] = rec
    if data.spec_error:
        ctx.problem(f"spec.yaml: {data.spec_error}")
    rounds = sorted({r.round for r in data.records})
    if len(rounds) > 1:
        ctx.problem(f"records.jsonl mixes rounds {rounds}")
    check_records(ctx)
    ctx.current_keys = current_run_keys(data)
    ctx.planned = planned_decisions(data)
    labels = task_labels(data)
    tasks = {label: task_summary(ctx, label) for label in labels}
    check_against_planner(ctx, tasks)
    finalists = [(label, name) for label in labels for name in tasks[label]["seedcheck"]["finalists"]]
    decide_finalists(ctx.rule, tasks, finalists)
    for label, t in tasks.items():
        t["fates"] = candidate_fates(ctx, label, t)
    summary = {
        "schema": SUMMARY_SCHEMA,
        "round": rounds[0] if len(rounds) == 1 else data.round_dir.name,
        "kind": round_kind(data),
        "records_file": {"count": len(data.records), "sha256": data.records_sha256},
        "spec_file": {"sha256": data.spec_sha256} if data.spec_sha256 else None,
        "protocol": protocol_lines(data.spec),
        "rule": {"alpha": ctx.rule.alpha, "confidence": ctx.rule.confidence, "min_pairs": ctx.rule.min_pairs,
                 "family_size": len(finalists), "text": ctx.rule.text(len(finalists))},
        "tasks": tasks,
        "compute": round_compute(tasks),
        "repeats": repeats(data.records),
        "decisions": {label: [f"{t}/{c}" for t, c in finalists
                              if tasks[t]["seedcheck"]["finalists"][c]["decision"] == label]
                      for label in SEEDCHECK_LABELS},
        "records": {r.run_key: record_row(r) for r in data.records},
        "mixed_conditions": mixed_conditions(ctx),
        "sandbox": sandbox_modes(data.records),
        "seed_controls": seed_controls(data.records),
        "problems": ctx.problems,
    }
    summary["plots"] = plot_list(summary, data)
    return summary


def current_run_keys(data: RoundData) -> set[str] | None:
    """The run keys of the records that are runs of the round's spec.yaml as it is (None without a readable spec)."""
    if data.spec is None:
        return None
    from orchestrator.planner import plan
    from orchestrator.progress import probed_batch_sizes

    try:
        p = plan(data.spec, data.records, batch_sizes=probed_batch_sizes(data.round_dir))
    except Exception:  # noqa: BLE001 - the planner's own check (integrity.check_against_planner) reports it
        return None
    unused = set(p.unused_records)
    return {r.run_key for r in data.records if r.run_key not in unused}


def planned_decisions(data: RoundData) -> dict[tuple[str, str, str], Any]:
    """The planner's stage decisions on the round's records (empty without a readable spec): a halving stage decides
    on the whole cohort of a rung and the sequential seed check look by look, so the report takes their decisions
    from the planner instead of judging one candidate at a time."""
    if data.spec is None:
        return {}
    from orchestrator.planner import plan
    from orchestrator.progress import probed_batch_sizes

    try:
        p = plan(data.spec, data.records, batch_sizes=probed_batch_sizes(data.round_dir))
    except Exception:  # noqa: BLE001 - the planner's own check (integrity.check_against_planner) reports it
        return {}
    return {(d.task, d.stage, d.candidate): d for d in p.decisions}


def protocol_lines(spec: Any) -> list[str]:
    """The round's decision rules per stage, in words (the report's protocol section)."""
    if spec is None:
        return []
    from orchestrator.planner import finalist_slots

    out = []
    for name, st in spec.stage_list():
        screen = getattr(st, "screen", None)
        if screen is not None and screen.rule == "halving":
            out.append(f"{name}: successive halving over seeds {', '.join(map(str, st.seeds))} in rungs of "
                       f"{', '.join(map(str, screen.rung_sizes(len(st.seeds))))} seed(s); at each rung a candidate "
                       f"whose one-sided {1 - screen.drop_p:.0%} t upper bound lies below the threshold is dropped "
                       f"and the best {screen.keep:g} share of the rest by mean paired delta goes on (FS candidates "
                       f"and controls apart); the last rung promotes those whose mean reaches the threshold")
        elif screen is not None:
            out.append(f"{name}: the original's threshold rule (promote when the mean paired delta over seeds "
                       f"{', '.join(map(str, st.seeds))} reaches the threshold)")
        elif name == SEEDCHECK and st.rule == "sequential":
            out.append(f"{name}: sequential paired t check on fresh seeds (looks after "
                       f"{', '.join(map(str, st.looks))} pairs), deciding on the {st.decide_on} metric; one-sided "
                       f"family-wise level {st.alpha:g} over looks (Pocock constant nominal level) and over "
                       f"{finalist_slots(spec)} FS finalist slot(s) (Bonferroni); controls "
                       f"({finalist_slots(spec, control=True)} slot(s)) form their own family; futility stop when "
                       f"the mean delta is <= 0 at a look")
        elif name == SEEDCHECK:
            out.append(f"{name}: the fixed check on seeds {', '.join(map(str, st.seeds))} (rule below), deciding on "
                       f"the {st.decide_on} metric")
        else:
            out.append(f"{name}: measured, decides nothing")
    out.append("a failed or diverged candidate seed counts as the metric's worst value under the halving and "
               "sequential rules (the threshold rule prunes the candidate); a baseline seed that failed for good "
               "removes that seed's pair, visibly; a candidate and baseline both at the task's chance level is a tie "
               "at chance, never promoted")
    return out


def conditions_of(rec: Record) -> dict[str, Any]:
    return {f: getattr(rec, f) for f in CONDITION_FIELDS}


def conditions_text(cond: dict[str, Any]) -> str:
    return (f"{cond['budget_steps']} steps, eval every {cond['eval_every']}, batch {cond['batch_size']}, "
            f"n_val {cond['n_val']}, data seed {cond['data_seed']}")


def split_conditions(ctx: Context, srecs: list[Record]) -> list[Record]:
    """A stage's records of one set of conditions (kept) and the rest (added to ctx.set_aside, never pooled). Kept:
    the current spec's runs where there is a spec, else the conditions of the stage's latest record; a record is set
    aside when its conditions differ from the kept ones or another record holds its (candidate, seed) slot."""
    if ctx.current_keys is not None and any(r.run_key in ctx.current_keys for r in srecs):
        current = [r for r in srecs if r.run_key in ctx.current_keys]
    else:
        latest = max(srecs, key=lambda r: (r.finished_at, r.run_key))
        current = [r for r in srecs if conditions_of(r) == conditions_of(latest)]
    main = conditions_of(current[0])
    kept_keys = {r.run_key for r in current}
    slots = {(r.candidate, r.seed) for r in current}
    for r in srecs:
        # a run the spec no longer asks for, of the same conditions and a slot of its own, stays (integrity names it)
        if r.run_key not in kept_keys and (r.candidate, r.seed) not in slots and conditions_of(r) == main:
            kept_keys.add(r.run_key)
            slots.add((r.candidate, r.seed))
    ctx.set_aside += [r for r in srecs if r.run_key not in kept_keys]
    return [r for r in srecs if r.run_key in kept_keys]


def mixed_conditions(ctx: Context) -> list[dict[str, Any]]:
    """The runs set aside: one row a run, with the slot it shares and its conditions."""
    return [{"task": r.task, "stage": r.stage, "candidate": r.candidate, "seed": r.seed, "run_key": r.run_key,
             "conditions": conditions_text(conditions_of(r)), "status": r.status, "value": r.value,
             "sources": [r.run_key]} for r in sorted(ctx.set_aside, key=lambda r: (r.task, stage_rank(r.stage),
                                                                                   r.candidate, r.seed, r.run_key))]


def sandbox_modes(records: list[Record]) -> dict[str, Any]:
    """How model-written code ran, over the round's runs: runs per mode ("not recorded" for runs whose task executes
    no code or that predate the field) and the runs that ran it without the sandbox."""
    modes: dict[str, int] = defaultdict(int)
    for r in records:
        modes[r.sandbox or "not recorded"] += 1
    return {"modes": dict(sorted(modes.items())), "unsafe_runs": [r.run_key for r in records if r.sandbox == "unsafe"]}


def seed_controls(records: list[Record]) -> dict[str, int]:
    """What the runs' seeds varied, counted over runs ("not recorded": records that predate the field, when every
    from-scratch seed shared one initialisation)."""
    out: dict[str, int] = defaultdict(int)
    for r in records:
        out["+".join(r.seed_controls) if r.seed_controls else "not recorded"] += 1
    return dict(sorted(out.items()))


def record_row(rec: Record) -> dict[str, Any]:
    """The fields of one record the summary cites (check_report compares them with the ledger)."""
    return {f: getattr(rec, f) for f in RECORD_FIELDS} | {"val_loss": rec.final.get("val_loss")}


def repeats(records: list[Record]) -> dict[str, Any]:
    """Runs of one configuration in several stages (typically the seed check's seed 0 repeating the med stage's
    runs): the same task, candidate, FS, seed, budget, eval cadence, batch and micro-batch, n_val, data seed and
    device. A run is a measurement, so their final metrics must agree to the last bit; when they do not, the round's
    numbers are not reproducible (nondeterminism, or code changed while the round ran) and the report says so before
    anything else."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.status != "ok":
            continue
        ident = [getattr(r, k) for k in CONFIGURATION_FIELDS]
        groups[json.dumps([ident, r.fs], sort_keys=True, default=str)].append(r)
    out = []
    for recs in groups.values():
        if len({r.stage for r in recs}) < 2:
            continue
        recs = sorted(recs, key=lambda r: (stage_rank(r.stage), r.run_key))
        finals = [json.dumps(r.final, sort_keys=True) for r in recs]
        out.append({"task": recs[0].task, "candidate": recs[0].candidate, "seed": recs[0].seed,
                    "run_keys": [r.run_key for r in recs], "values": [r.value for r in recs],
                    "identical": len(set(finals)) == 1 and len({repr(r.value) for r in recs}) == 1})
    return {"groups": out, "identical": sum(g["identical"] for g in out),
            "differing": sum(not g["identical"] for g in out)}


def round_kind(data: RoundData) -> str:
    """"comparison" (seedcheck is the only stage: no screening, nothing pruned) or "screening". From the spec;
    without one, from the records (a screening round records quick runs before any seed-check run)."""
    if data.spec is not None:
        return "comparison" if data.spec.is_comparison else "screening"
    return "comparison" if {r.stage for r in data.records} == {SEEDCHECK} else "screening"


def task_labels(data: RoundData) -> list[str]:
    seen = list(data.spec.tasks) if data.spec is not None else []
    for rec in data.records:
        if rec.task not in seen:
            seen.append(rec.task)
    return seen


def spec_metric(spec_task: Any) -> str | None:
    """The decision metric of a task that has no records yet: the spec's, else the task's primary metric."""
    if spec_task is None:
        return None
    if spec_task.metric:
        return spec_task.metric
    from tasks import task_class

    return task_class(spec_task.task).primary_metric


def stage_names(data: RoundData, recs: list[Record]) -> list[str]:
    names = [n for n, _ in data.spec.stage_list()] if data.spec is not None else []
    for r in sorted(recs, key=lambda r: stage_rank(r.stage)):
        if r.stage not in names:
            names.append(r.stage)
    return names


# ---------------------------------------------------------------------------------------------------------------------
# per task
# ---------------------------------------------------------------------------------------------------------------------
def task_summary(ctx: Context, label: str) -> dict[str, Any]:
    from orchestrator.report.integrity import check_promotions

    recs = [r for r in ctx.data.records if r.task == label]
    spec_task = ctx.data.spec.tasks.get(label) if ctx.data.spec is not None else None
    metrics = sorted({r.metric for r in recs})
    if len(metrics) > 1:
        ctx.problem(f"task {label}: records use different metrics {metrics}")
    thresholds = sorted({r.threshold for r in recs if r.threshold is not None})
    threshold = spec_task.threshold if spec_task is not None else (thresholds[0] if thresholds else 0.0)
    if not isinstance(threshold, (int, float)):  # in baseline SDs: the value the planner measured
        threshold = next((d.threshold for (t, _, _), d in ctx.planned.items() if t == label), None)
        threshold = threshold if threshold is not None else (thresholds[0] if thresholds else 0.0)
    if any(t != threshold for t in thresholds):
        ctx.problem(f"task {label}: records carry threshold(s) {thresholds}, the spec says {threshold}")
    candidates = [c.name for c in spec_task.candidates] if spec_task is not None else []
    for r in recs:
        if not is_baseline(r) and r.candidate not in candidates:
            candidates.append(r.candidate)
    stages = stage_names(ctx.data, recs)
    out: dict[str, Any] = {
        "task_kind": recs[0].task_kind if recs else (spec_task.task if spec_task is not None else None),
        "metric": metrics[0] if metrics else spec_metric(spec_task),
        "threshold": threshold,
        "candidates": candidates,
        "status": task_status_from_records(recs),
        "stages": {},
        "seedcheck": {"seeds": [], "finalists": {}},
        "failed_runs": [failed_run(r) for r in recs if r.status != "ok"],
    }
    for stage in stages:
        srecs = [r for r in recs if r.stage == stage]
        if srecs:
            out["stages"][stage] = stage_summary(ctx, stage, split_conditions(ctx, srecs), candidates, threshold)
    check_promotions(ctx, label, out["stages"])
    if SEEDCHECK in out["stages"]:
        out["seedcheck"] = seedcheck_pairs(ctx, out["stages"][SEEDCHECK], threshold)
    out["noise"] = noise(out)
    out["compute"] = task_compute(ctx, recs, stages, candidates)
    return out


def task_status_from_records(recs: list[Record]) -> str:
    """The task's status before the planner's word on it: not started, the first failed baseline, or ok."""
    if not recs:
        return "not started"
    for r in recs:
        if r.status != "ok" and is_baseline(r):
            return f"failed: baseline {r.run_key} {r.status} ({r.error_kind or '-'}: {r.error_message or '-'})"
    return "ok"


def test_value(r: Record) -> float | None:
    """The run's held-out test value of its decision metric (test_<metric>), None where the run has none."""
    v = r.test.get("test_" + r.metric) if r.status == "ok" else None
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def failed_run(r: Record) -> dict[str, Any]:
    return {"run_key": r.run_key, "stage": r.stage, "candidate": r.candidate, "seed": r.seed, "status": r.status,
            "error_kind": r.error_kind, "error_message": r.error_message, "sources": [r.run_key]}


def stage_summary(ctx: Context, stage: str, srecs: list[Record], candidates: list[str],
                  threshold: float) -> dict[str, Any]:
    seeds = ctx.spec_seeds(stage) or sorted({r.seed for r in srecs})
    first = srecs[0]
    out: dict[str, Any] = {"budget_steps": first.budget_steps, "eval_every": first.eval_every,
                           "batch_size": first.batch_size, "n_val": first.n_val, "seeds": seeds,
                           "baselines": {}, "candidates": {}}
    for r in srecs:
        if is_baseline(r):
            out["baselines"][seed_key(r.seed)] = {
                "run_key": r.run_key, "seed": r.seed, "status": r.status, "value": r.value,
                "test_value": test_value(r), "val_loss": r.final.get("val_loss"), "steps": r.steps,
                "batch_size": r.batch_size,
                "micro_batch": r.micro_batch, "wall_s": r.wall_s, "sources": [r.run_key]}
    for name in candidates:
        crecs = sorted((r for r in srecs if r.candidate == name and not is_baseline(r)), key=lambda r: r.seed)
        if crecs:
            out["candidates"][name] = candidate_at_stage(ctx, stage, seeds, crecs, threshold)
    return out


def candidate_at_stage(ctx: Context, stage: str, seeds: list[int], crecs: list[Record],
                       threshold: float) -> dict[str, Any]:
    """One candidate's runs at one stage (per seed: value, matched baseline, delta) and the stage's decision on it,
    made by orchestrator.decisions.screen from the same deltas the planner decides on."""
    per_seed = {}
    deltas: dict[int, float | None] = {}
    for r in crecs:
        base = ctx.baseline_of(r)
        base_value = base.value if base is not None and base.status == "ok" else None
        delta = r.value - base_value if r.status == "ok" and r.value is not None and base_value is not None else None
        deltas[r.seed] = delta
        base_loss = base.final.get("val_loss") if base is not None else None
        loss = r.final.get("val_loss")
        test, base_test = test_value(r), test_value(base) if base is not None and base.status == "ok" else None
        per_seed[seed_key(r.seed)] = {
            "run_key": r.run_key, "baseline_key": r.baseline_key, "seed": r.seed,
            "status": r.status, "value": r.value, "baseline_value": base_value, "delta": delta,
            "test_value": test, "baseline_test_value": base_test,
            "test_delta": None if test is None or base_test is None else test - base_test,
            "val_loss": loss, "baseline_val_loss": base_loss,
            "delta_loss": None if loss is None or base_loss is None or delta is None else loss - base_loss,
            "record_decision": r.decision, "wall_s": r.wall_s,
            "sources": [r.run_key] + ([r.baseline_key] if r.baseline_key else [])}
    failed = next((r for r in crecs if r.status != "ok"), None)
    failure = f"seed {failed.seed}: {failed.status}" if failed is not None else None
    judged = screen(stage, seeds, deltas, failure, threshold)
    planned = ctx.planned.get((crecs[0].task, stage, crecs[0].candidate))
    if planned is not None and is_gate(stage):  # the decision the planner acted on (halving: the rung's cohort)
        judged = type(judged)(stage, planned.decision, planned.mean_delta, planned.threshold, planned.reason)
    test_deltas = [s["test_delta"] for s in per_seed.values() if s["test_delta"] is not None]
    return {"mode": crecs[0].mode, "seeds": per_seed, "n_pairs": sum(d is not None for d in deltas.values()),
            "mean_delta": judged.mean_delta, "stage_decision": judged.decision,
            "mean_test_delta": math.fsum(test_deltas) / len(test_deltas) if test_deltas else None,
            "sources": [k for s in per_seed.values() for k in s["sources"]]}


# ---------------------------------------------------------------------------------------------------------------------
# seed check
# ---------------------------------------------------------------------------------------------------------------------
def seedcheck_pairs(ctx: Context, stage: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Per finalist: the paired deltas of the seed check's seeds, the seeds left out and why, and the statistics
    (the decision is added by decide_finalists, over the whole round's family)."""
    finalists = {}
    for name, cand in stage["candidates"].items():
        deltas, seeds, excluded = {}, [], []
        for seed in stage["seeds"]:
            s = cand["seeds"].get(seed_key(seed))
            if s is None:
                excluded.append({"seed": seed, "reason": "no record"})
            elif s["delta"] is None:
                base = ctx.by_key.get(s["baseline_key"] or "")
                why = (f"candidate {s['status']}" if s["status"] != "ok" else
                       "baseline missing" if base is None else f"baseline {base.status}")
                excluded.append({"seed": seed, "reason": why, "run_key": s["run_key"]})
            else:
                deltas[seed_key(seed)] = s["delta"]
                seeds.append(seed)
        task = ctx.by_key[cand["sources"][0]].task if cand["sources"] and cand["sources"][0] in ctx.by_key else None
        planned = ctx.planned.get((task, SEEDCHECK, name))
        sequential = planned is not None and planned.label is not None
        if sequential:  # the planner decided look by look, on its metric, with failed seeds at the worst value
            deltas = {seed_key(s): d for s, d in planned.deltas.items() if d is not None}
            seeds = sorted(planned.deltas)
            excluded = [{"seed": s, "reason": "baseline failed for good: pair removed"} for s in planned.removed_pairs]
        st = paired_stats(list(deltas.values()), ctx.rule.confidence) if deltas else None
        entry = {"n": len(deltas), "seeds": seeds, "deltas": deltas, "excluded": excluded,
                 "threshold": threshold, "sources": cand["sources"]}
        if st is not None:
            entry.update({k: v for k, v in st.as_dict().items() if k not in ("n", "deltas")})
        entry["_stats"] = st
        if sequential:
            entry.update(rule="sequential", decision=planned.label, reason=planned.reason, metric=planned.metric,
                         val_deltas={seed_key(s): v for s, v in planned.val_deltas.items()},
                         worst_seeds=planned.worst_seeds, p_one_sided=planned.p_value, level=planned.level,
                         p_t_holm=None, control=planned.control)
        elif task is not None and ctx.data.spec is not None and task in ctx.data.spec.tasks:
            entry["control"] = ctx.data.spec.is_control(task, name)
        finalists[name] = entry
    if any(f.get("rule") == "sequential" for f in finalists.values()):  # the pool seeds the looks used
        seeds_used = sorted({s for f in finalists.values() for s in f["seeds"]} |
                            {e["seed"] for f in finalists.values() for e in f["excluded"]})
    else:
        seeds_used = stage["seeds"]
    return {"seeds": seeds_used, "finalists": finalists, "versus_control": versus_control(finalists)}


def versus_control(finalists: dict[str, Any]) -> list[dict[str, Any]]:
    """Every checked FS finalist against every checked control, on the seeds both have: the paired differences of
    their deltas (the matched baseline cancels: candidate - control on the same seed)."""
    out = []
    for fs, f in finalists.items():
        if f.get("control"):
            continue
        for ctl, c in finalists.items():
            if not c.get("control"):
                continue
            common = [k for k in f["deltas"] if k in c["deltas"]]
            diffs = [f["deltas"][k] - c["deltas"][k] for k in common]
            row: dict[str, Any] = {"candidate": fs, "control": ctl, "n": len(diffs), "seeds": common}
            if diffs:
                st = paired_stats(diffs)
                row.update(mean=st.mean, ci_low=st.ci_low, ci_high=st.ci_high, p_t_greater=st.p_t_greater,
                           p_sign_flip_greater=st.p_sign_flip_greater)
            out.append(row)
    return out


def decide_finalists(rule: SeedCheckRule, tasks: dict[str, Any], finalists: list[tuple[str, str]]) -> None:
    """The fixed check's decisions over the round's Holm family (sequential finalists were decided by the planner)."""
    every = [tasks[t]["seedcheck"]["finalists"][c] for t, c in finalists]
    for e in every:
        if e.get("rule") == "sequential":
            e.pop("_stats", None)
    entries = [e for e in every if e.get("rule") != "sequential"]
    stats = [e.pop("_stats") for e in entries]
    for entry, (label, why, p) in zip(entries, rule.decide_family(stats, [e["threshold"] for e in entries])):
        entry["p_t_holm"] = p
        entry["decision"] = label
        entry["reason"] = why


def candidate_fates(ctx: Context, label: str, t: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What happened to every candidate of the task: the last stage it reached, its outcome there and why (the
    planner's word where the spec is readable, else the stage decision its records give), the seed check's decision
    for a finalist, whether it is a control, and its failed runs."""
    planner = t.pop("planner_candidates", None) or {}
    spec = ctx.data.spec
    out = {}
    for name in t["candidates"]:
        stages = [st for st, s in t["stages"].items() if name in s["candidates"]]
        reached = stages[-1] if stages else None
        mode = t["stages"][reached]["candidates"][name]["mode"] if reached else None
        if spec is not None and hasattr(spec, "is_control"):
            control = spec.is_control(label, name)
        else:
            control = mode == "read_twice"
        fate = {"mode": mode, "control": control, "reached": reached, "outcome": None, "reason": ""}
        if name in planner:
            fate.update(outcome=planner[name]["status"], reason=planner[name]["reason"],
                        reached=planner[name]["reached"] if stages else None)
        elif reached is not None:
            fate["outcome"] = t["stages"][reached]["candidates"][name]["stage_decision"]
        fin = t["seedcheck"]["finalists"].get(name)
        if fin is not None:
            fate["outcome"] = f"seed check: {fin['decision']}"
            fate["reason"] = fin["reason"]
        if not stages:
            fate["outcome"] = fate["outcome"] or "not run"
        fate["failed_runs"] = [f"{r['stage']} seed {r['seed']}: {r['status']} ({r['error_kind'] or '-'}: "
                               f"{r['error_message'] or '-'})" for r in t["failed_runs"] if r["candidate"] == name]
        out[name] = fate
    return out


def noise(t: dict[str, Any]) -> dict[str, Any] | None:
    """How much one seed moves things, measured by the seed check: the baseline's sample SD over its seeds and each
    finalist's paired-delta SD. A screening stage decides on the delta of its seeds; with one seed that delta spreads
    about ±1.96·SD around the candidate's true effect, which the report sets against the threshold."""
    sc = t["stages"].get(SEEDCHECK)
    if sc is None:
        return None
    base = [b["value"] for b in sc["baselines"].values() if b["value"] is not None]
    delta_sd = {name: f["sd"] for name, f in t["seedcheck"]["finalists"].items() if f.get("sd") is not None}
    if len(base) < 2 and not delta_sd:
        return None
    sd = max(delta_sd.values()) if delta_sd else None
    spread = 1.96 * sd if sd is not None else None
    # P(a candidate with no effect reaches the threshold at one seed), delta ~ Normal(0, sd)
    null_pass = None if not sd else 0.5 * math.erfc(t["threshold"] / (sd * math.sqrt(2.0)))
    single = [stage for stage, st in t["stages"].items() if is_gate(stage) and len(st["seeds"]) == 1]
    return {"baseline_sd": sample_sd(base), "baseline_n": len(base), "delta_sd": delta_sd,
            "single_seed_spread": spread, "null_pass_probability": null_pass, "single_seed_screens": single,
            "screens_noisy": bool(single) and spread is not None and spread > t["threshold"]}


# ---------------------------------------------------------------------------------------------------------------------
# compute
# ---------------------------------------------------------------------------------------------------------------------
def task_compute(ctx: Context, recs: list[Record], stages: list[str], candidates: list[str]) -> dict[str, Any]:
    """Wall time spent per stage and what running every candidate through every stage would have cost."""
    total_wall = math.fsum(r.wall_s for r in recs)
    ok = [r for r in recs if r.status == "ok" and r.steps > 0]
    ok_steps = sum(r.steps for r in ok)
    per_step = math.fsum(r.wall_s for r in ok) / ok_steps if ok_steps else None
    out_stages = {}
    for stage in stages:
        srecs = [r for r in recs if r.stage == stage]
        seeds = ctx.spec_seeds(stage) or sorted({r.seed for r in srecs})
        full_runs = (len(candidates) + 1) * len(seeds)
        wall = math.fsum(r.wall_s for r in srecs)
        if srecs:
            mean = wall / len(srecs)
            basis = "this stage's mean wall time per run"
        elif per_step is not None and ctx.data.spec is not None:
            mean = per_step * ctx.data.spec.stage(stage).steps
            basis = "the task's wall time per step x this stage's steps (stage not run)"
        else:
            mean = None
            basis = "no runs to estimate from"
        # every candidate that ran at the stage got one decision there; the stage's baselines serve them all
        decided = len({r.candidate for r in srecs if not is_baseline(r)})
        out_stages[stage] = {
            "runs": len(srecs), "wall_s": wall, "mean_wall_s": mean, "full_runs": full_runs,
            "decisions": decided, "wall_per_decision_s": wall / decided if decided else None,
            "full_wall_s": None if mean is None else mean * full_runs, "estimate_basis": basis,
            "sources": [r.run_key for r in srecs]}
    full = [s["full_wall_s"] for s in out_stages.values()]
    full_total = math.fsum(full) if all(f is not None for f in full) else None
    return {"stages": out_stages, "spent_wall_s": total_wall, "full_wall_s": full_total,
            "saved_wall_s": None if full_total is None else full_total - total_wall,
            "saved_fraction": None if not full_total else (full_total - total_wall) / full_total,
            "sources": [r.run_key for r in recs]}


def round_compute(tasks: dict[str, Any]) -> dict[str, Any]:
    stages: dict[str, dict[str, Any]] = {}
    for t in tasks.values():
        for name, st in t["compute"]["stages"].items():
            agg = stages.setdefault(name, {"runs": 0, "wall_s": 0.0})
            agg["runs"] += st["runs"]
            agg["wall_s"] += st["wall_s"]
    spent = math.fsum(t["compute"]["spent_wall_s"] for t in tasks.values())
    known = [t["compute"] for t in tasks.values() if t["compute"]["full_wall_s"] is not None]
    full = math.fsum(c["full_wall_s"] for c in known) if known else None
    spent_known = math.fsum(c["spent_wall_s"] for c in known)
    return {"stages": stages, "spent_wall_s": spent, "full_wall_s": full,
            "saved_wall_s": None if full is None else full - spent_known,
            "saved_fraction": None if not full else (full - spent_known) / full,
            "tasks_without_estimate": [label for label, t in tasks.items() if t["compute"]["full_wall_s"] is None]}
