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
    labels = task_labels(data)
    tasks = {label: task_summary(ctx, label) for label in labels}
    check_against_planner(ctx, tasks)
    finalists = [(label, name) for label in labels for name in tasks[label]["seedcheck"]["finalists"]]
    decide_finalists(ctx.rule, tasks, finalists)
    summary = {
        "schema": SUMMARY_SCHEMA,
        "round": rounds[0] if len(rounds) == 1 else data.round_dir.name,
        "kind": round_kind(data),
        "records_file": {"count": len(data.records), "sha256": data.records_sha256},
        "spec_file": {"sha256": data.spec_sha256} if data.spec_sha256 else None,
        "rule": {"alpha": ctx.rule.alpha, "confidence": ctx.rule.confidence, "min_pairs": ctx.rule.min_pairs,
                 "family_size": len(finalists), "text": ctx.rule.text(len(finalists))},
        "tasks": tasks,
        "compute": round_compute(tasks),
        "repeats": repeats(data.records),
        "decisions": {label: [f"{t}/{c}" for t, c in finalists
                              if tasks[t]["seedcheck"]["finalists"][c]["decision"] == label]
                      for label in SEEDCHECK_LABELS},
        "records": {r.run_key: record_row(r) for r in data.records},
        "problems": ctx.problems,
    }
    summary["plots"] = plot_list(summary, data)
    return summary


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
            out["stages"][stage] = stage_summary(ctx, stage, srecs, candidates, threshold)
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
                "val_loss": r.final.get("val_loss"), "steps": r.steps, "batch_size": r.batch_size,
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
        per_seed[seed_key(r.seed)] = {
            "run_key": r.run_key, "baseline_key": r.baseline_key, "seed": r.seed,
            "status": r.status, "value": r.value, "baseline_value": base_value, "delta": delta,
            "val_loss": loss, "baseline_val_loss": base_loss,
            "delta_loss": None if loss is None or base_loss is None or delta is None else loss - base_loss,
            "record_decision": r.decision, "wall_s": r.wall_s,
            "sources": [r.run_key] + ([r.baseline_key] if r.baseline_key else [])}
    failed = next((r for r in crecs if r.status != "ok"), None)
    failure = f"seed {failed.seed}: {failed.status}" if failed is not None else None
    judged = screen(stage, seeds, deltas, failure, threshold)
    return {"seeds": per_seed, "n_pairs": sum(d is not None for d in deltas.values()),
            "mean_delta": judged.mean_delta, "stage_decision": judged.decision,
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
        st = paired_stats(list(deltas.values()), ctx.rule.confidence) if deltas else None
        entry = {"n": len(deltas), "seeds": seeds, "deltas": deltas, "excluded": excluded,
                 "threshold": threshold, "sources": cand["sources"]}
        if st is not None:
            entry.update({k: v for k, v in st.as_dict().items() if k not in ("n", "deltas")})
        entry["_stats"] = st
        finalists[name] = entry
    return {"seeds": stage["seeds"], "finalists": finalists}


def decide_finalists(rule: SeedCheckRule, tasks: dict[str, Any], finalists: list[tuple[str, str]]) -> None:
    entries = [tasks[t]["seedcheck"]["finalists"][c] for t, c in finalists]
    stats = [e.pop("_stats") for e in entries]
    for entry, (label, why, p) in zip(entries, rule.decide_family(stats, [e["threshold"] for e in entries])):
        entry["p_t_holm"] = p
        entry["decision"] = label
        entry["reason"] = why


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
        out_stages[stage] = {
            "runs": len(srecs), "wall_s": wall, "mean_wall_s": mean, "full_runs": full_runs,
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
