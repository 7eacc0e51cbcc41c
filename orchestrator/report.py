"""A round's report, derived from its records alone, and the check that re-derives it.

`write_report(round_dir)` writes <round>/report/:
  summary.json   every number of the report with the run keys it comes from (machine-readable)
  report.md      per task: matched baselines, each stage's candidates with deltas and decisions, the seed-check
                 table (intervals, p-values, decision), compute per stage and what pruning saved; the decision rule.
                 A comparison round (seedcheck its only stage: every candidate on every seed, nothing pruned) says so
                 instead of describing screening and pruning (summary.json "kind": "comparison" | "screening").
  summary.txt    the same results in the original system's text formats (seed_system.md §4.6)
  deltas_<task>.png, curves_<task>.png
`check_report(round_dir)` recomputes the summary from records.jsonl (+ spec.yaml, + each run's metrics.jsonl for the
final-eval cross-check), compares it number by number with summary.json, re-renders report.md and summary.txt, and
returns one message per mismatch or missing record (empty: the report is exactly what the records say).

Sources of every number: records.jsonl (values, deltas, wall times, decisions), spec.yaml (stage seeds/steps and the
task's candidate list: only for the cost of running every candidate through every stage), run_dir/metrics.jsonl (the
validation curves in the plots, and a cross-check that a record's value is its run's final evaluation).

Torch-free; matplotlib is imported lazily with the Agg backend.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from orchestrator.records import Ledger, LedgerError
from orchestrator.stats import DecisionRule, paired_stats, sample_sd
from orchestrator.planner import meets_threshold

REPORT_DIR = "report"
SUMMARY_SCHEMA = 1
STAGE_ORDER = ("quick", "med", "long", "seedcheck")
GATE_STAGES = ("quick", "med")  # stages whose mean delta decides promotion (orchestrator.spec.GATE_STAGES)
SEEDCHECK = "seedcheck"
TEXT_RULE_WIDTH = 108  # the original's `=`/`-` rules
FLOAT_REL_TOL = 1e-12  # records vs recomputation (the same float operations: equal up to JSON round trips)
FLOAT_ABS_TOL = 1e-15
MAX_DIFF_LINES = 5  # re-rendered files: how many differing lines a message quotes
MAX_NAMED_SOURCES = 8
DECISION_COLOURS = {"confirmed": "#2ca02c", "inconclusive": "#ff7f0e", "rejected": "#d62728",
                    "promote": "#1f77b4", "prune": "#7f7f7f", "pending": "#bcbd22", "recorded": "#9467bd"}


class ReportError(Exception):
    """The round folder cannot be reported on (no records, unreadable ledger): one line."""


# ---------------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class RoundData:
    round_dir: Path
    records: list[dict[str, Any]]
    records_sha256: str
    spec: Any | None  # orchestrator.spec.Spec
    spec_sha256: str | None
    spec_error: str | None
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # run_key -> metrics.jsonl rows
    curve_files: dict[str, str] = field(default_factory=dict)  # run_key -> metrics.jsonl path found


def load_round(round_dir: Path) -> RoundData:
    round_dir = Path(round_dir)
    path = round_dir / "records.jsonl"
    if not path.exists():
        raise ReportError(f"{round_dir}: no records.jsonl (has the round run?)")
    try:
        records = [r.model_dump(mode="json", by_alias=True) for r in Ledger(path).read()]
    except LedgerError as e:
        raise ReportError(str(e)) from None
    raw = path.read_bytes()
    spec = spec_sha = spec_error = None
    spec_path = round_dir / "spec.yaml"
    if spec_path.exists():
        from orchestrator.spec import SpecError, parse_spec_text

        text = spec_path.read_text(encoding="utf-8")
        spec_sha = hashlib.sha256(text.encode()).hexdigest()
        try:
            spec = parse_spec_text(text, str(spec_path))
        except SpecError as e:
            spec_error = str(e)
    data = RoundData(round_dir, records, hashlib.sha256(raw).hexdigest(), spec, spec_sha, spec_error)
    for rec in records:
        metrics = _find_metrics_file(round_dir, rec)
        if metrics is not None:
            data.curves[rec["run_key"]] = _read_jsonl(metrics)
            data.curve_files[rec["run_key"]] = str(metrics)
    return data


def _find_metrics_file(round_dir: Path, rec: dict[str, Any]) -> Path | None:
    tries = []
    if rec.get("run_dir"):
        run_dir = Path(rec["run_dir"])
        tries = [run_dir] if run_dir.is_absolute() else [Path.cwd() / run_dir, round_dir / run_dir,
                                                         round_dir.parent / run_dir, round_dir.parent.parent / run_dir]
    tries.append(round_dir / "runs" / rec["run_key"] / f"attempt-{rec.get('attempt', 0)}")
    for d in tries:
        if (d / "metrics.jsonl").is_file():
            return d / "metrics.jsonl"
    return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # a torn last line (the run was cut short while writing)
            raise ReportError(f"{path}: line {i + 1} is not JSON") from None
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# the summary: every number, with its sources
# ---------------------------------------------------------------------------------------------------------------------
RECORD_FIELDS = ("task", "stage", "candidate", "mode", "seed", "status", "error_kind", "metric", "value",
                 "baseline_key", "baseline_value", "delta", "threshold", "decision", "steps", "budget_steps",
                 "eval_every", "n_val", "data_seed", "batch_size", "micro_batch", "wall_s")
MATCH_FIELDS = ("task", "stage", "seed", "batch_size", "budget_steps", "eval_every", "n_val", "data_seed")


def _is_baseline(rec: dict[str, Any]) -> bool:
    return rec.get("mode") == "baseline"


def _seed_key(seed: int) -> str:
    return f"s{seed}"


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=FLOAT_REL_TOL, abs_tol=FLOAT_ABS_TOL)


def _stage_rank(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage), "") if stage in STAGE_ORDER else (len(STAGE_ORDER), stage)


def _spec_metric(spec_task: Any) -> str | None:
    """The decision metric of a task that has no records yet: the spec's, else the task's primary metric."""
    if spec_task is None:
        return None
    if spec_task.metric:
        return spec_task.metric
    from tasks import task_class

    return task_class(spec_task.task).primary_metric


def _task_status(state: Any) -> str:
    """A planner TaskState in words."""
    if state.status == "running":
        return f"running (stage {state.stage})" if state.stage else "waiting"
    if state.status == "failed":
        return f"failed: {state.reason}"
    if state.status == "needs_probe":
        return "needs batch probe"
    return "done" + (f" ({state.reason})" if state.reason else "")


class _Builder:
    def __init__(self, data: RoundData, rule: DecisionRule):
        self.data = data
        self.rule = rule
        self.recs = data.records
        self.by_key: dict[str, dict[str, Any]] = {}
        self.problems: list[dict[str, Any]] = []

    def problem(self, message: str, *run_keys: str) -> None:
        self.problems.append({"message": message, "run_keys": [k for k in run_keys if k]})

    # ------------------------------------------------------------------------------------------------------------
    def build(self) -> dict[str, Any]:
        for rec in self.recs:
            key = rec["run_key"]
            if key in self.by_key:
                self.problem(f"record {key}: appears twice in records.jsonl", key)
            self.by_key[key] = rec
        if self.data.spec_error:
            self.problem(f"spec.yaml: {self.data.spec_error}")
        rounds = sorted({r["round"] for r in self.recs})
        if len(rounds) > 1:
            self.problem(f"records.jsonl mixes rounds {rounds}")
        self.check_records()
        labels = self.task_labels()
        tasks = {label: self.task_summary(label) for label in labels}
        self.check_against_planner(tasks)
        finalists = [(label, name) for label in labels for name in tasks[label]["seedcheck"]["finalists"]]
        self.decide_finalists(tasks, finalists)
        summary = {
            "schema": SUMMARY_SCHEMA,
            "round": rounds[0] if len(rounds) == 1 else self.data.round_dir.name,
            "kind": self.round_kind(),
            "records_file": {"count": len(self.recs), "sha256": self.data.records_sha256},
            "spec_file": {"sha256": self.data.spec_sha256} if self.data.spec_sha256 else None,
            "rule": {"alpha": self.rule.alpha, "confidence": self.rule.confidence, "min_pairs": self.rule.min_pairs,
                     "family_size": len(finalists), "text": self.rule.text(len(finalists))},
            "tasks": tasks,
            "compute": self.round_compute(tasks),
            "repeats": self.repeats(),
            "decisions": {lab: [f"{t}/{c}" for t, c in finalists
                                if tasks[t]["seedcheck"]["finalists"][c]["decision"] == lab]
                          for lab in ("confirmed", "inconclusive", "rejected")},
            "records": {r["run_key"]: {f: r.get(f) for f in RECORD_FIELDS} | {"val_loss": r["final"].get("val_loss")}
                        for r in self.recs},
            "problems": self.problems,
        }
        summary["plots"] = plot_list(summary, self.data)
        return summary

    def repeats(self) -> dict[str, Any]:
        """Runs of one configuration in several stages (typically the seed check's seed 0 repeating the med stage's
        runs): the same task, candidate, FS, seed, budget, eval cadence, batch and micro-batch, n_val, data seed and
        device. A run is a measurement, so their final metrics must agree to the last bit; when they do not, the
        round's numbers are not reproducible (nondeterminism, or code changed while the round ran) and the report says
        so before anything else."""
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in self.recs:
            if r["status"] != "ok":
                continue
            ident = [r.get(k) for k in ("task", "candidate", "mode", "seed", "budget_steps", "eval_every",
                                        "batch_size", "micro_batch", "n_val", "data_seed", "metric", "device")]
            groups[json.dumps([ident, r.get("fs")], sort_keys=True, default=str)].append(r)
        out = []
        for recs in groups.values():
            if len({r["stage"] for r in recs}) < 2:
                continue
            recs = sorted(recs, key=lambda r: (_stage_rank(r["stage"]), r["run_key"]))
            finals = [json.dumps(r["final"], sort_keys=True) for r in recs]
            out.append({"task": recs[0]["task"], "candidate": recs[0]["candidate"], "seed": recs[0]["seed"],
                        "run_keys": [r["run_key"] for r in recs], "values": [r["value"] for r in recs],
                        "identical": len(set(finals)) == 1 and len({repr(r["value"]) for r in recs}) == 1})
        return {"groups": out, "identical": sum(g["identical"] for g in out),
                "differing": sum(not g["identical"] for g in out)}

    def round_kind(self) -> str:
        """"comparison" (seedcheck is the only stage: no screening, nothing pruned) or "screening". From the spec;
        without one, from the records (a screening round records quick runs before any seed-check run)."""
        if self.data.spec is not None:
            return "comparison" if self.data.spec.is_comparison else "screening"
        stages = {r["stage"] for r in self.recs}
        return "comparison" if stages == {SEEDCHECK} else "screening"

    def check_against_planner(self, tasks: dict[str, Any]) -> None:
        """The planner (orchestrator.planner) decides promotions and task states from the same records: it must agree
        with the report's own reading of them, and every record must be a run of the spec."""
        if self.data.spec is None:
            return
        from orchestrator.planner import plan
        from orchestrator.progress import probed_batch_sizes

        try:
            p = plan(self.data.spec, self.recs, batch_sizes=probed_batch_sizes(self.data.round_dir))
        except Exception as e:  # noqa: BLE001 - a planner that cannot read the records is itself a finding
            self.problem(f"planner: cannot plan from these records ({type(e).__name__}: {e})")
            return
        for key in p.unused_records:
            self.problem(f"record {key}: not a run of the current spec.yaml (an earlier version of the spec?)", key)
        for label, state in p.tasks.items():
            if label in tasks:
                tasks[label]["status"] = _task_status(state)
        for d in p.decisions:
            if d.decision not in ("promote", "prune"):
                continue
            mine = tasks.get(d.task, {}).get("stages", {}).get(d.stage, {}).get("candidates", {}).get(d.candidate)
            if mine is None:
                self.problem(f"task {d.task}: the planner decided {d.decision} for {d.candidate} at {d.stage}, "
                             f"which has no records here")
            elif mine["stage_decision"] != d.decision or not _close(mine["mean_delta"], d.mean_delta):
                self.problem(f"task {d.task}: {d.candidate} at {d.stage}: the planner says {d.decision} (mean delta "
                             f"{d.mean_delta!r}), the records give {mine['stage_decision']} (mean delta "
                             f"{mine['mean_delta']!r})", *mine["sources"])

    def task_labels(self) -> list[str]:
        seen = list(self.data.spec.tasks) if self.data.spec is not None else []
        for rec in self.recs:
            if rec["task"] not in seen:
                seen.append(rec["task"])
        return seen

    # per-record integrity -------------------------------------------------------------------------------------------
    def check_records(self) -> None:
        stage_seeds: dict[tuple[str, str], set[int]] = defaultdict(set)
        for rec in self.recs:
            stage_seeds[(rec["task"], rec["stage"])].add(rec["seed"])
        for rec in self.recs:
            key = rec["run_key"]
            metric = rec["metric"]
            final = rec["final"].get("val_" + metric)
            if rec["status"] == "ok" and not _close(rec["value"], final):
                self.problem(f"record {key}: value {rec['value']!r} is not final['val_{metric}'] = {final!r}", key)
            best = rec.get("best") or {}
            for orig, name in (("best_val_loss", "val_loss"), ("best_val_tok_acc", "val_tok_acc")):
                if rec["status"] == "ok" and name in best and not _close(rec.get(orig), best.get(name)):
                    self.problem(f"record {key}: {orig} {rec.get(orig)!r} is not best['{name}'] {best.get(name)!r}",
                                 key)
            expect = {"failed": "failed", "diverged": "diverged"}.get(rec["status"])
            if expect is None:
                expect = "baseline" if _is_baseline(rec) else None
            if expect is not None and rec["decision"] != expect:
                self.problem(f"record {key}: decision {rec['decision']!r} but status {rec['status']!r} "
                             f"({'baseline' if _is_baseline(rec) else 'candidate'}) means {expect!r}", key)
            self.check_curve(rec)
            if _is_baseline(rec):
                continue
            base_key = rec.get("baseline_key")
            if not base_key:
                self.problem(f"record {key}: a candidate run without baseline_key", key)
                continue
            base = self.by_key.get(base_key)
            if base is None:
                self.problem(f"missing record {base_key}: the matched baseline of {key} is not in records.jsonl",
                             key, base_key)
                continue
            if not _is_baseline(base):
                self.problem(f"record {key}: baseline_key {base_key} is not a baseline run", key, base_key)
            for f in MATCH_FIELDS:
                if rec.get(f) != base.get(f):
                    self.problem(f"record {key}: its baseline {base_key} differs in {f} "
                                 f"({rec.get(f)!r} vs {base.get(f)!r}): not a matched comparison", key, base_key)
            base_value = base["value"] if base["status"] == "ok" else None
            if rec["status"] != "ok":
                continue
            if not _close(rec.get("baseline_value"), base_value):
                self.problem(f"record {key}: baseline_value {rec.get('baseline_value')!r} but its baseline "
                             f"{base_key} has value {base_value!r}", key, base_key)
            delta = None if base_value is None or rec["value"] is None else rec["value"] - base_value
            if not _close(rec.get("delta"), delta):
                self.problem(f"record {key}: delta {rec.get('delta')!r} but value - baseline value = {delta!r} "
                             f"(baseline {base_key})", key, base_key)
            seeds = self.spec_seeds(rec["stage"]) or stage_seeds[(rec["task"], rec["stage"])]
            single_seed = len(seeds) == 1
            if rec["stage"] in GATE_STAGES and single_seed and delta is not None and rec.get("threshold") is not None:
                expect_d = "promote" if meets_threshold(delta, rec["threshold"]) else "prune"
            else:
                expect_d = "recorded"
            if rec["decision"] != expect_d:
                self.problem(f"record {key}: decision {rec['decision']!r} but delta {delta!r} and threshold "
                             f"{rec.get('threshold')!r} give {expect_d!r}", key)

    def check_curve(self, rec: dict[str, Any]) -> None:
        rows = self.data.curves.get(rec["run_key"])
        if not rows or rec["status"] != "ok":
            return
        final_rows = [r for r in rows if r.get("step") == rec["steps"]]
        name = "val_" + rec["metric"]
        if final_rows and name in final_rows[-1] and not _close(final_rows[-1][name], rec["value"]):
            self.problem(f"record {rec['run_key']}: value {rec['value']!r} but its metrics.jsonl has {name} = "
                         f"{final_rows[-1][name]!r} at step {rec['steps']}", rec["run_key"])

    # per task ---------------------------------------------------------------------------------------------------------
    def task_records(self, label: str) -> list[dict[str, Any]]:
        return [r for r in self.recs if r["task"] == label]

    def task_summary(self, label: str) -> dict[str, Any]:
        recs = self.task_records(label)
        spec_task = self.data.spec.tasks.get(label) if self.data.spec is not None else None
        metrics = sorted({r["metric"] for r in recs})
        if len(metrics) > 1:
            self.problem(f"task {label}: records use different metrics {metrics}")
        thresholds = sorted({r["threshold"] for r in recs if r.get("threshold") is not None})
        threshold = spec_task.threshold if spec_task is not None else (thresholds[0] if thresholds else 0.0)
        if any(t != threshold for t in thresholds):
            self.problem(f"task {label}: records carry threshold(s) {thresholds}, the spec says {threshold}")
        candidates = [c.name for c in spec_task.candidates] if spec_task is not None else []
        for r in recs:
            if not _is_baseline(r) and r["candidate"] not in candidates:
                candidates.append(r["candidate"])
        stages = self.stage_names(recs)
        out: dict[str, Any] = {
            "task_kind": recs[0]["task_kind"] if recs else (spec_task.task if spec_task is not None else None),
            "metric": metrics[0] if metrics else _spec_metric(spec_task),
            "threshold": threshold,
            "candidates": candidates,
            "status": "not started" if not recs else "ok",
            "stages": {},
            "seedcheck": {"seeds": [], "finalists": {}},
            "failed_runs": [],
        }
        for r in recs:
            if r["status"] != "ok":
                out["failed_runs"].append({"run_key": r["run_key"], "stage": r["stage"], "candidate": r["candidate"],
                                           "seed": r["seed"], "status": r["status"],
                                           "error_kind": r.get("error_kind"),
                                           "error_message": r.get("error_message"), "sources": [r["run_key"]]})
                if _is_baseline(r) and out["status"] == "ok":
                    out["status"] = (f"failed: baseline {r['run_key']} {r['status']}"
                                     f" ({r.get('error_kind') or '-'}: {r.get('error_message') or '-'})")
        for stage in stages:
            srecs = [r for r in recs if r["stage"] == stage]
            if srecs:
                out["stages"][stage] = self.stage_summary(stage, srecs, candidates, threshold)
        self.check_promotions(label, out["stages"])
        if SEEDCHECK in out["stages"]:
            out["seedcheck"] = self.seedcheck_pairs(out["stages"][SEEDCHECK], threshold)
        out["noise"] = self.noise(out)
        out["compute"] = self.task_compute(label, recs, stages, candidates)
        return out

    @staticmethod
    def noise(t: dict[str, Any]) -> dict[str, Any] | None:
        """How much one seed moves things, measured by the seed check: the baseline's sample SD over its seeds and
        each finalist's paired-delta SD. A screening stage decides on the delta of its seeds; with one seed that delta
        spreads about ±1.96·SD around the candidate's true effect, which the report sets against the threshold."""
        sc = t["stages"].get(SEEDCHECK)
        if sc is None:
            return None
        base = [b["value"] for b in sc["baselines"].values() if b["value"] is not None]
        delta_sd = {name: f["sd"] for name, f in t["seedcheck"]["finalists"].items() if f.get("sd") is not None}
        if len(base) < 2 and not delta_sd:
            return None
        base_sd = sample_sd(base)
        sd = max(delta_sd.values()) if delta_sd else None
        spread = 1.96 * sd if sd is not None else None
        # P(a candidate with no effect reaches the threshold at one seed), delta ~ Normal(0, sd)
        null_pass = None if not sd else 0.5 * math.erfc(t["threshold"] / (sd * math.sqrt(2.0)))
        single = [stage for stage, st in t["stages"].items() if stage in GATE_STAGES and len(st["seeds"]) == 1]
        return {"baseline_sd": base_sd, "baseline_n": len(base), "delta_sd": delta_sd,
                "single_seed_spread": spread, "null_pass_probability": null_pass, "single_seed_screens": single,
                "screens_noisy": bool(single) and spread is not None and spread > t["threshold"]}

    def check_promotions(self, label: str, stages: dict[str, Any]) -> None:
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
                    self.problem(f"task {label}: {name} ran at {stage} but was not promoted at {prev}: {why}",
                                 *cand["sources"])
        if SEEDCHECK in stages and self.data.spec is not None and self.data.spec.stages.seedcheck is not None:
            limit = self.data.spec.stages.seedcheck.max_finalists
            if len(stages[SEEDCHECK]["candidates"]) > limit:
                self.problem(f"task {label}: {len(stages[SEEDCHECK]['candidates'])} finalists at {SEEDCHECK}, "
                             f"the spec allows {limit}")

    def stage_names(self, recs: list[dict[str, Any]]) -> list[str]:
        names = [n for n, _ in self.data.spec.stage_list()] if self.data.spec is not None else []
        for r in sorted(recs, key=lambda r: _stage_rank(r["stage"])):
            if r["stage"] not in names:
                names.append(r["stage"])
        return names

    def spec_seeds(self, stage: str) -> list[int] | None:
        if self.data.spec is None:
            return None
        try:
            return list(self.data.spec.stage(stage).seeds)
        except KeyError:
            return None

    def stage_summary(self, stage: str, srecs: list[dict[str, Any]], candidates: list[str],
                      threshold: float) -> dict[str, Any]:
        seeds = self.spec_seeds(stage) or sorted({r["seed"] for r in srecs})
        first = srecs[0]
        out: dict[str, Any] = {"budget_steps": first["budget_steps"], "eval_every": first["eval_every"],
                               "batch_size": first["batch_size"], "n_val": first["n_val"], "seeds": seeds,
                               "baselines": {}, "candidates": {}}
        for r in srecs:
            if _is_baseline(r):
                out["baselines"][_seed_key(r["seed"])] = {
                    "run_key": r["run_key"], "seed": r["seed"], "status": r["status"], "value": r["value"],
                    "val_loss": r["final"].get("val_loss"), "steps": r["steps"], "batch_size": r["batch_size"],
                    "micro_batch": r["micro_batch"], "wall_s": r["wall_s"], "sources": [r["run_key"]]}
        for name in candidates:
            crecs = sorted((r for r in srecs if r["candidate"] == name and not _is_baseline(r)),
                           key=lambda r: r["seed"])
            if not crecs:
                continue
            per_seed = {}
            deltas = []
            for r in crecs:
                base = self.by_key.get(r.get("baseline_key") or "")
                base_value = base["value"] if base is not None and base["status"] == "ok" else None
                delta = None
                if r["status"] == "ok" and r["value"] is not None and base_value is not None:
                    delta = r["value"] - base_value
                    deltas.append(delta)
                base_loss = base["final"].get("val_loss") if base is not None else None
                loss = r["final"].get("val_loss")
                per_seed[_seed_key(r["seed"])] = {
                    "run_key": r["run_key"], "baseline_key": r.get("baseline_key"), "seed": r["seed"],
                    "status": r["status"], "value": r["value"], "baseline_value": base_value, "delta": delta,
                    "val_loss": loss, "baseline_val_loss": base_loss,
                    "delta_loss": None if loss is None or base_loss is None or delta is None else loss - base_loss,
                    "record_decision": r["decision"], "wall_s": r["wall_s"],
                    "sources": [r["run_key"]] + ([r["baseline_key"]] if r.get("baseline_key") else [])}
            mean = math.fsum(deltas) / len(deltas) if deltas else None
            complete = len(deltas) == len(seeds)
            if stage not in GATE_STAGES:
                rule = "statistics" if stage == SEEDCHECK else "recorded"  # long: informational, no promotion
            elif any(r["status"] != "ok" for r in crecs):
                rule = "prune"  # a failed or diverged candidate run is pruned
            elif not complete:
                rule = "pending"
            else:
                rule = "promote" if meets_threshold(mean, threshold) else "prune"
            out["candidates"][name] = {
                "seeds": per_seed, "n_pairs": len(deltas), "mean_delta": mean, "stage_decision": rule,
                "sources": [k for s in per_seed.values() for k in s["sources"]]}
        return out

    # seed check -------------------------------------------------------------------------------------------------------
    def seedcheck_pairs(self, stage: dict[str, Any], threshold: float) -> dict[str, Any]:
        finalists = {}
        for name, cand in stage["candidates"].items():
            deltas, seeds, excluded = {}, [], []
            for seed in stage["seeds"]:
                s = cand["seeds"].get(_seed_key(seed))
                if s is None:
                    excluded.append({"seed": seed, "reason": "no record"})
                elif s["delta"] is None:
                    base = self.by_key.get(s["baseline_key"] or "")
                    why = (f"candidate {s['status']}" if s["status"] != "ok" else
                           "baseline missing" if base is None else f"baseline {base['status']}")
                    excluded.append({"seed": seed, "reason": why, "run_key": s["run_key"]})
                else:
                    deltas[_seed_key(seed)] = s["delta"]
                    seeds.append(seed)
            st = paired_stats(list(deltas.values()), self.rule.confidence) if deltas else None
            entry = {"n": len(deltas), "seeds": seeds, "deltas": deltas, "excluded": excluded,
                     "threshold": threshold, "sources": cand["sources"]}
            if st is not None:
                entry.update({k: v for k, v in st.as_dict().items() if k not in ("n", "deltas")})
            entry["_stats"] = st
            finalists[name] = entry
        return {"seeds": stage["seeds"], "finalists": finalists}

    def decide_finalists(self, tasks: dict[str, Any], finalists: list[tuple[str, str]]) -> None:
        stats = [tasks[t]["seedcheck"]["finalists"][c].pop("_stats") for t, c in finalists]
        adjusted = self.rule.holm_family(stats)
        for (t, c), st, p in zip(finalists, stats, adjusted):
            entry = tasks[t]["seedcheck"]["finalists"][c]
            label, why = self.rule.decide(st, entry["threshold"], p)
            entry["p_t_holm"] = p
            entry["decision"] = label
            entry["reason"] = why

    # compute ----------------------------------------------------------------------------------------------------------
    def task_compute(self, label: str, recs: list[dict[str, Any]], stages: list[str],
                     candidates: list[str]) -> dict[str, Any]:
        total_wall = math.fsum(r["wall_s"] for r in recs)
        ok = [r for r in recs if r["status"] == "ok" and r["steps"] > 0]
        ok_steps = sum(r["steps"] for r in ok)
        per_step = math.fsum(r["wall_s"] for r in ok) / ok_steps if ok_steps else None
        out_stages = {}
        for stage in stages:
            srecs = [r for r in recs if r["stage"] == stage]
            seeds = self.spec_seeds(stage) or sorted({r["seed"] for r in srecs})
            full_runs = (len(candidates) + 1) * len(seeds)
            wall = math.fsum(r["wall_s"] for r in srecs)
            if srecs:
                mean = wall / len(srecs)
                basis = "this stage's mean wall time per run"
            elif per_step is not None and self.data.spec is not None:
                mean = per_step * self.data.spec.stage(stage).steps
                basis = "the task's wall time per step x this stage's steps (stage not run)"
            else:
                mean = None
                basis = "no runs to estimate from"
            out_stages[stage] = {
                "runs": len(srecs), "wall_s": wall, "mean_wall_s": mean, "full_runs": full_runs,
                "full_wall_s": None if mean is None else mean * full_runs, "estimate_basis": basis,
                "sources": [r["run_key"] for r in srecs]}
        full = [s["full_wall_s"] for s in out_stages.values()]
        full_total = math.fsum(full) if all(f is not None for f in full) else None
        return {"stages": out_stages, "spent_wall_s": total_wall, "full_wall_s": full_total,
                "saved_wall_s": None if full_total is None else full_total - total_wall,
                "saved_fraction": None if not full_total else (full_total - total_wall) / full_total,
                "sources": [r["run_key"] for r in recs]}

    def round_compute(self, tasks: dict[str, Any]) -> dict[str, Any]:
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
                "tasks_without_estimate": [label for label, t in tasks.items()
                                           if t["compute"]["full_wall_s"] is None]}


def build_summary(data: RoundData, rule: DecisionRule | None = None) -> dict[str, Any]:
    """Everything the report says, as plain JSON data, derived from the round's records."""
    return _Builder(data, rule or DecisionRule()).build()


# ---------------------------------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------------------------------
def _f(v: float | None, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


def _p(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def _wall(v: float | None) -> str:
    return "—" if v is None else f"{v:,.1f}"


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return out


def _caption_deltas(task: dict[str, Any]) -> str:
    return (f"Deltas of the final validation {task['metric']} against the matched baseline (candidate − baseline, "
            f"same stage and seed), one row per stage and candidate. Quick/med: a large marker at the candidate's "
            f"mean delta over the stage's seeds, coloured by the promotion rule (blue promoted, grey pruned, yellow "
            f"stage not complete); long: purple (recorded, no promotion); small dots: single seeds where a stage has "
            f"several. Seed check: mean delta (large marker) with its t-based 95% interval (bar) and every seed's "
            f"delta (small dots), coloured by decision (green confirmed, orange inconclusive, red rejected). Solid "
            f"line: zero; dashed red line: the task's threshold ({task['threshold']:g}).")


def _caption_curves(task: dict[str, Any]) -> str:
    return (f"Validation curves per stage: val_{task['metric']} (top) and val_loss (bottom) against optimizer step, "
            f"from each run's metrics.jsonl; black = matched baseline, colours = candidates (the same colour in "
            f"every stage); stages with several seeds show the mean over the seeds that have the step.")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def plot_list(summary: dict[str, Any], data: RoundData) -> list[dict[str, str]]:
    plots = []
    for label, task in summary["tasks"].items():
        has_deltas = any(c["mean_delta"] is not None for st in task["stages"].values()
                         for c in st["candidates"].values())
        if has_deltas:
            plots.append({"task": label, "kind": "deltas", "file": f"deltas_{_safe(label)}.png",
                          "caption": _caption_deltas(task)})
        keys = [s["run_key"] for st in task["stages"].values() for s in st["baselines"].values()]
        keys += [s["run_key"] for st in task["stages"].values() for c in st["candidates"].values()
                 for s in c["seeds"].values()]
        if any(k in data.curves for k in keys):
            plots.append({"task": label, "kind": "curves", "file": f"curves_{_safe(label)}.png",
                          "caption": _caption_curves(task)})
    return plots


# ---------------------------------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------------------------------
# what makes two runs "one configuration" for the repeats check (_Builder.repeats), in words
_SAME_CONFIGURATION = ("(same task, candidate, FS, seed, budget, eval cadence, batch, micro-batch, n_val, data seed "
                       "and device)")


def render_markdown(summary: dict[str, Any]) -> str:
    s = summary
    lines = [f"# Round `{s['round']}`: report", ""]
    lines += [f"Derived from `records.jsonl` ({s['records_file']['count']} records, sha256 "
              f"`{s['records_file']['sha256'][:16]}`)"
              + (f" and `spec.yaml` (sha256 `{s['spec_file']['sha256'][:16]}`)" if s["spec_file"] else "")
              + f". Every number below is recomputed by `fsearch report {s['round']} --check`, which fails on any "
              f"mismatch or missing record.", ""]
    if s["problems"]:
        lines += ["## Integrity problems", "", "The records contradict each other; the numbers below cannot be "
                  "trusted until these are resolved:", ""]
        lines += [f"- {p['message']}" for p in s["problems"]] + [""]
    rep = s["repeats"]
    if rep["differing"]:
        lines += ["## Not reproducible", "", f"{rep['differing']} of {len(rep['groups'])} configurations that ran in "
                  f"more than one stage {_SAME_CONFIGURATION} gave different final metrics. A run should be a "
                  "measurement: find the nondeterminism (or the code change during the round) before trusting any "
                  "number below.", ""]
        lines += _table(["task", "candidate", "seed", "runs", "values"],
                        [[f"`{g['task']}`", g["candidate"], g["seed"], ", ".join(f"`{k}`" for k in g["run_keys"]),
                          ", ".join(_f(v, ".6g") for v in g["values"])] for g in rep["groups"] if not g["identical"]])
        lines.append("")
    lines += ["## Decision rule (seed check)", "", s["rule"]["text"], ""]
    comparison = s.get("kind") == "comparison"
    if comparison:
        lines += ["A comparison round: the seed check is its only stage. Every candidate of every task runs on every "
                  "seed against the matched baseline of that seed (same stage, seed, batch and budget); nothing is "
                  "screened or pruned; the task's threshold enters only the decision rule above.", ""]
    else:
        lines += ["Screening stages (quick, med, long): a candidate is promoted when its mean delta over the stage's "
                  "seeds (candidate − matched baseline of the same stage and seed) reaches the task's threshold; a "
                  "failed or diverged candidate run is pruned. These are screens, not significance tests.", ""]
    lines += ["## Summary", ""]
    rows = []
    for label, t in s["tasks"].items():
        fin = t["seedcheck"]["finalists"]
        count = {lab: sum(f["decision"] == lab for f in fin.values()) for lab in ("confirmed", "inconclusive",
                                                                                   "rejected")}
        rows.append([f"`{label}`", t["task_kind"], t["metric"], f"{t['threshold']:g}", t["status"],
                     ", ".join(t["stages"]) or "—", len(t["candidates"]), len(fin),
                     count["confirmed"], count["inconclusive"], count["rejected"]])
    lines += _table(["task", "kind", "metric", "threshold", "status", "stages run", "candidates", "finalists",
                     "confirmed", "inconclusive", "rejected"], rows)
    c = s["compute"]
    if comparison:
        cost = (f"Compute (sum of run wall times): spent {_wall(c['spent_wall_s'])} s; the whole round (every "
                f"candidate and the baseline on every seed, nothing pruned) costs about {_wall(c['full_wall_s'])} s.")
    else:
        cost = (f"Compute (sum of run wall times): spent {_wall(c['spent_wall_s'])} s; running every candidate "
                f"through every stage would have cost about {_wall(c['full_wall_s'])} s; pruning saved about "
                f"{_wall(c['saved_wall_s'])} s"
                + (f" ({c['saved_fraction']:.0%})." if c["saved_fraction"] is not None else "."))
    lines += ["", cost
              + (f" No estimate for {', '.join(c['tasks_without_estimate'])} (a stage that never ran and no finished "
                 f"run to take a time per step from); those tasks are left out of the estimate and the saving."
                 if c["tasks_without_estimate"] else ""), ""]
    if rep["groups"] and not rep["differing"]:
        lines += [f"Reproducibility: {len(rep['groups'])} configuration(s) ran in more than one stage "
                  f"{_SAME_CONFIGURATION}; every repeat gave bit-identical final metrics.", ""]
    for label, t in s["tasks"].items():
        lines += _task_markdown(label, t, s)
    return "\n".join(lines).rstrip() + "\n"


def _task_markdown(label: str, t: dict[str, Any], s: dict[str, Any]) -> list[str]:
    lines = [f"## Task `{label}`", "",
             f"Kind `{t['task_kind']}`, decision metric final `val_{t['metric']}` (higher is better), threshold "
             f"{t['threshold']:g}; candidates: {', '.join(t['candidates']) or '—'}. Status: {t['status']}.", ""]
    lines += ["### Matched baselines", ""]
    rows = []
    for stage, st in t["stages"].items():
        for b in st["baselines"].values():
            rows.append([stage, b["seed"], f"`{b['run_key']}`", b["status"], _f(b["value"]), _f(b["val_loss"]),
                         f"{b['steps']}/{st['budget_steps']}", f"{b['batch_size']} ({b['micro_batch']})",
                         _wall(b["wall_s"])])
    lines += _table(["stage", "seed", "run", "status", t["metric"], "val_loss", "steps/budget",
                     "batch (micro)", "wall s"], rows) if rows else ["No baseline records."]
    lines.append("")
    for stage, st in t["stages"].items():
        seeds = ", ".join(str(x) for x in st["seeds"])
        lines += [f"### Stage `{stage}`", "",
                  f"{st['budget_steps']} steps, eval every {st['eval_every']}, batch {st['batch_size']}, "
                  f"n_val {st['n_val']}, seeds {seeds}.", ""]
        rows = []
        for name, cand in st["candidates"].items():
            for sk, r in cand["seeds"].items():
                rows.append([name, r["seed"], f"`{r['run_key']}`", r["status"], _f(r["value"]),
                             _f(r["baseline_value"]), _f(r["delta"], "+.4f"), r["record_decision"]])
            if len(st["seeds"]) > 1 and stage != SEEDCHECK:
                rows.append([f"**{name}**", "mean", "", "", "", "", _f(cand["mean_delta"], "+.4f"),
                             f"**{cand['stage_decision']}**"])
        if rows:
            lines += _table(["candidate", "seed", "run", "status", t["metric"], "baseline", "delta",
                             "decision"], rows)
        else:
            lines.append("No candidate records.")
        if stage != SEEDCHECK:
            kept = [n for n, c in st["candidates"].items() if c["stage_decision"] == "promote"]
            pruned = [n for n, c in st["candidates"].items() if c["stage_decision"] == "prune"]
            lines += ["", f"Promoted: {', '.join(kept) or 'none'}. Pruned: {', '.join(pruned) or 'none'}."]
        lines.append("")
    fin = t["seedcheck"]["finalists"]
    if fin:
        seeds = t["seedcheck"]["seeds"]
        lines += ["### Seed check", "",
                  f"Paired deltas over seeds {', '.join(str(x) for x in seeds)}; Holm family: all "
                  f"{s['rule']['family_size']} finalist(s) of the round.", ""]
        alpha = s["rule"]["alpha"]
        if 2.0 ** -len(seeds) >= alpha:
            need = next(n for n in range(1, 64) if 2.0 ** -n < alpha)
            lines += [f"**With {len(seeds)} seeds no finalist can be confirmed:** the one-sided sign-flip p-value "
                      f"cannot go below 2^-{len(seeds)} = {2.0 ** -len(seeds):.4g} ≥ {alpha:g}; at least {need} "
                      f"seeds are needed.", ""]
        rows = []
        for name, f in fin.items():
            per_seed = " ".join(_f(f["deltas"].get(_seed_key(x)), "+.4f") for x in seeds)
            ci = "—" if f.get("ci_low") is None else f"[{f['ci_low']:+.4f}, {f['ci_high']:+.4f}]"
            rows.append([name, f["n"], per_seed, _f(f.get("mean"), "+.4f"), ci, _f(f.get("sd")),
                         f"{f.get('wins', 0)}/{f['n']}", _p(f.get("p_t_two_sided")), _p(f["p_t_holm"]),
                         _p(f.get("p_sign_flip_greater")), _p(f.get("p_sign_flip_two_sided")),
                         _p(f.get("p_wilcoxon_greater")), f"**{f['decision']}**"])
        lines += _table(["candidate", "n", "delta per seed", "mean", "95% t-interval", "sd", "wins",
                         "p t (2-sided)", "p t Holm", "p sign-flip (1-sided)", "p sign-flip (2-sided)",
                         "p Wilcoxon (1-sided)", "decision"], rows)
        lines.append("")
        for name, f in fin.items():
            extra = ""
            if f["excluded"]:
                extra = " Excluded seeds: " + "; ".join(
                    f"{e['seed']} ({e['reason']}{', ' + e['run_key'] if e.get('run_key') else ''})"
                    for e in f["excluded"]) + "."
            exact = "" if f.get("sign_flip_exact", True) else " Sign-flip p is a Monte Carlo estimate (fixed seed)."
            lines.append(f"- `{name}`: {f['decision']} — {f['reason']}.{extra}{exact}")
        lines.append("")
    lines += _noise_markdown(t)
    if t["failed_runs"]:
        lines += ["### Failed runs", ""]
        lines += _table(["run", "stage", "candidate", "seed", "status", "error"],
                        [[f"`{r['run_key']}`", r["stage"], r["candidate"], r["seed"], r["status"],
                          f"{r['error_kind'] or '-'}: {r['error_message'] or '-'}"] for r in t["failed_runs"]])
        lines.append("")
    comp = t["compute"]
    lines += ["### Compute", ""]
    rows = [[stage, c["runs"], _wall(c["wall_s"]), _wall(c["mean_wall_s"]), c["full_runs"], _wall(c["full_wall_s"]),
             c["estimate_basis"]] for stage, c in comp["stages"].items()]
    lines += _table(["stage", "runs", "wall s", "mean s/run", "runs if nothing pruned", "wall s if nothing pruned",
                     "estimate from"], rows)
    if s.get("kind") == "comparison":
        lines += ["", f"Spent {_wall(comp['spent_wall_s'])} s; every candidate ({len(t['candidates'])}) plus the "
                  f"baseline on every seed (a comparison round: nothing pruned): about {_wall(comp['full_wall_s'])} s.",
                  ""]
    else:
        lines += ["", f"Spent {_wall(comp['spent_wall_s'])} s; every candidate ({len(t['candidates'])}) plus the "
                  f"baseline through every stage: about {_wall(comp['full_wall_s'])} s; pruning saved about "
                  f"{_wall(comp['saved_wall_s'])} s"
                  + (f" ({comp['saved_fraction']:.0%})." if comp["saved_fraction"] is not None else "."), ""]
    plots = [p for p in s["plots"] if p["task"] == label]
    if plots:
        lines += ["### Plots", ""]
        for p in plots:
            lines += [f"![{p['kind']} {label}]({p['file']})", "", f"*{p['caption']}*", ""]
    return lines


def _noise_markdown(t: dict[str, Any]) -> list[str]:
    n = t.get("noise")
    if not n:
        return []
    parts = []
    if n["baseline_sd"] is not None:
        parts.append(f"over the seed check's {n['baseline_n']} seeds the baseline's {t['metric']} has a standard "
                     f"deviation of {n['baseline_sd']:.4f}")
    if n["delta_sd"]:
        parts.append("the paired deltas' standard deviation is " + ", ".join(
            f"{sd:.4f} ({name})" for name, sd in n["delta_sd"].items()))
    text = (f"Seed-to-seed noise at the seed check's budget ({t['stages'][SEEDCHECK]['budget_steps']} steps): "
            + "; ".join(parts) + ".")
    if n["single_seed_spread"] is not None:
        text += (f" A single seed's delta therefore lands within about ±{n['single_seed_spread']:.4f} of the "
                 f"candidate's true effect (95%), against a threshold of {t['threshold']:g}.")
    if n["screens_noisy"]:
        text += (f" **The single-seed screens of this task ({', '.join(n['single_seed_screens'])}) are mostly seed "
                 f"noise at this threshold**: a candidate with no effect passes one with probability about "
                 f"{n['null_pass_probability']:.0%} (normal approximation, largest paired SD). Give the screens more "
                 f"seeds, or a threshold that matches this spread.")
    return ["### Noise", "", text, ""]


# ---------------------------------------------------------------------------------------------------------------------
# summary.txt in the original's formats (seed_system.md §4.6)
# ---------------------------------------------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _pp(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.2f}pp"


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def render_text(summary: dict[str, Any]) -> str:
    s = summary
    out = [f"# fsearch round {s['round']}: the original's summary formats (R22-R27 round format, then the "
           f"multi-seed paired format)",
           "# acc = final val_<metric> on the fixed validation set (the task's decision metric), loss = final "
           "val_loss, both from the same (final) eval;",
           "# d_acc = candidate - matched baseline of the SAME stage and seed (never the quick baseline); "
           "[KEEP|PRUNE] = promotion at that stage;",
           "# stages with several seeds show means over seeds; seedcheck decisions follow report.md's rule."]
    if s["repeats"]["differing"]:
        out.append(f"# NOT REPRODUCIBLE: {s['repeats']['differing']} configuration(s) that ran in more than one stage "
                   f"gave different final metrics (report.md lists them)")
    for label, t in s["tasks"].items():
        out += ["=" * TEXT_RULE_WIDTH, f"[{label}]"]
        if t["status"].startswith("failed") or not t["stages"]:
            out.append("  baseline failed or missing" + (f": {t['status']}" if t["status"] != "ok" else ""))
        for stage, st in t["stages"].items():
            if stage == SEEDCHECK:
                continue
            bvals = [b["value"] for b in st["baselines"].values() if b["value"] is not None]
            blosses = [b["val_loss"] for b in st["baselines"].values() if b["val_loss"] is not None]
            if not bvals:
                continue  # the task's failure line above says why
            out.append(f"  baseline {stage}: acc={_pct(_mean(bvals))} loss={_f(_mean(blosses))} "
                       f"bsz={st['batch_size']}")
            cands = sorted(st["candidates"].items(),
                           key=lambda kv: -math.inf if kv[1]["mean_delta"] is None else -kv[1]["mean_delta"])
            if stage != "quick":
                out.append(f"  {stage} confirmed:")
            for name, c in cands:
                vals = [r["value"] for r in c["seeds"].values() if r["value"] is not None]
                losses = [r["val_loss"] for r in c["seeds"].values() if r["val_loss"] is not None]
                tag = {"promote": "KEEP", "prune": "PRUNE"}.get(c["stage_decision"], c["stage_decision"].upper())
                loss_part = f" loss={_f(_mean(losses))}" if stage != "quick" else ""
                out.append(f"    {name:24s} d_acc={_pp(c['mean_delta'])} acc={_pct(_mean(vals))}{loss_part} [{tag}]")
        sc = t["stages"].get(SEEDCHECK)
        for name, f in t["seedcheck"]["finalists"].items():
            out.append(f"  seedcheck {name}:")
            for seed in t["seedcheck"]["seeds"]:
                r = sc["candidates"][name]["seeds"].get(_seed_key(seed)) if sc else None
                if r is None:
                    out.append(f"    seed={seed}: missing")
                    continue
                out.append(f"    seed={seed}: baseline={_pct(r['baseline_value'])} fs={_pct(r['value'])} "
                           f"d_acc={_pp(r['delta'])}")
            out.append(f"    mean d_acc={_pp(f.get('mean'))}, positive_seeds={f.get('wins', 0)}/{f['n']}")
            ci = "n/a" if f.get("ci_low") is None else f"[{_pp(f['ci_low'])}, {_pp(f['ci_high'])}]"
            out.append(f"    95% CI {ci} p_t_holm={_p(f['p_t_holm'])} "
                       f"p_signflip_1sided={_p(f.get('p_sign_flip_greater'))} decision={f['decision'].upper()}")
        out.append("-" * TEXT_RULE_WIDTH)
    for label, t in s["tasks"].items():
        sc = t["stages"].get(SEEDCHECK)
        for name, f in t["seedcheck"]["finalists"].items():
            filt = {"round": s["round"], "task": label, "stage": SEEDCHECK, "candidate": name, "metric": t["metric"],
                    "steps": sc["budget_steps"], "bsz": sc["batch_size"], "seeds": t["seedcheck"]["seeds"]}
            rows = [r for r in sc["candidates"][name]["seeds"].values() if r["delta"] is not None]
            d = [r["delta"] for r in rows]
            dl = [r["delta_loss"] for r in rows if r["delta_loss"] is not None]
            sign = (sum(x > 0 for x in d), sum(x == 0 for x in d), sum(x < 0 for x in d))
            out += ["", f"filter: {filt!r}", "-" * TEXT_RULE_WIDTH,
                    f"pairs={len(d)} mean d_acc={_f(_mean(d), '+.4f')} std={_f(_pstd(d))} | "
                    f"mean d_loss={_f(_mean(dl), '+.4f')} std={_f(_pstd(dl))} | "
                    f"sign(+/0/-)={sign[0]}/{sign[1]}/{sign[2]}"]
            for r in rows:
                out.append(f"  seed={r['seed']} d_acc={r['delta']:+.4f} (no={r['baseline_value']:.4f} "
                           f"fs={r['value']:.4f}) d_loss={_f(r['delta_loss'], '+.4f')}")
    return "\n".join(out) + "\n"


def _pstd(values: list[float]) -> float | None:
    """Population standard deviation (what the original's summaries print)."""
    if not values:
        return None
    m = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / len(values))


# ---------------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(summary: dict[str, Any], data: RoundData, out_dir: Path) -> list[Path]:
    written = []
    for p in summary["plots"]:
        t = summary["tasks"][p["task"]]
        path = out_dir / p["file"]
        if p["kind"] == "deltas":
            _plot_deltas(summary["round"], p["task"], t, path)
        else:
            _plot_curves(summary["round"], p["task"], t, data, path)
        written.append(path)
    return written


def _plot_deltas(round_name: str, label: str, t: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rows = []  # (label, mean, ci or None, per-seed deltas, colour)
    for stage, st in t["stages"].items():
        if stage == SEEDCHECK:
            continue
        for name, c in st["candidates"].items():
            if c["mean_delta"] is not None:
                d = [r["delta"] for r in c["seeds"].values() if r["delta"] is not None]
                rows.append((f"{stage} · {name}", c["mean_delta"], None, d if len(d) > 1 else [],
                             DECISION_COLOURS.get(c["stage_decision"], "#7f7f7f"), c["stage_decision"]))
    for name, f in t["seedcheck"]["finalists"].items():
        if f["n"]:
            ci = None if f.get("ci_low") is None else (f["ci_low"], f["ci_high"])
            rows.append((f"seedcheck · {name}", f["mean"], ci, list(f["deltas"].values()),
                         DECISION_COLOURS[f["decision"]], f["decision"]))
    fig, ax = plt.subplots(figsize=(8.5, 1.2 + 0.45 * max(len(rows), 1)))
    for i, (_, mean, ci, per_seed, colour, _kind) in enumerate(reversed(rows)):
        if ci is not None:
            ax.plot(ci, [i, i], color=colour, linewidth=2.5, solid_capstyle="butt")
            ax.plot([ci[0], ci[0]], [i - 0.15, i + 0.15], color=colour, linewidth=2)
            ax.plot([ci[1], ci[1]], [i - 0.15, i + 0.15], color=colour, linewidth=2)
        if per_seed:
            ax.scatter(per_seed, [i + 0.22] * len(per_seed), s=12, color=colour, alpha=0.7, zorder=3)
        ax.scatter([mean], [i], s=60, color=colour, edgecolor="black", zorder=4)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in reversed(rows)])
    ax.axvline(0.0, color="black", linewidth=1)
    ax.axvline(t["threshold"], color="#d62728", linestyle="--", linewidth=1, label=f"threshold {t['threshold']:g}")
    ax.set_xlabel(f"delta of final val_{t['metric']} (candidate − matched baseline)")
    ax.set_title(f"{round_name} · {label}: deltas vs matched baselines")
    if not rows:
        ax.text(0.5, 0.5, "no paired deltas", transform=ax.transAxes, ha="center")
    present = [k for k in DECISION_COLOURS if k in {r[5] for r in rows}]
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=DECISION_COLOURS[k], label=k) for k in present]
    handles.append(plt.Line2D([], [], color="#d62728", linestyle="--", label=f"threshold {t['threshold']:g}"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def _mean_curve(runs: list[list[dict[str, Any]]], key: str) -> tuple[list[int], list[float]]:
    per_step: dict[int, list[float]] = defaultdict(list)
    for rows in runs:
        for r in rows:
            v = r.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v) and "step" in r:
                per_step[int(r["step"])].append(float(v))
    steps = sorted(s for s, vs in per_step.items() if len(vs) == len(runs))
    return steps, [math.fsum(per_step[s]) / len(per_step[s]) for s in steps]


def _plot_curves(round_name: str, label: str, t: dict[str, Any], data: RoundData, path: Path) -> None:
    plt = _pyplot()
    stages = list(t["stages"].items())
    colours = plt.get_cmap("tab10").colors
    colour_of = {name: colours[i % len(colours)] for i, name in enumerate(t["candidates"])}
    fig, axes = plt.subplots(2, len(stages), figsize=(4.2 * len(stages), 6.2), squeeze=False)
    keys = (f"val_{t['metric']}", "val_loss")
    for col, (stage, st) in enumerate(stages):
        series = [("baseline", [data.curves[b["run_key"]] for b in st["baselines"].values()
                                if b["run_key"] in data.curves], "black", 2.2)]  # drawn on top
        for name, c in st["candidates"].items():
            series.append((name, [data.curves[r["run_key"]] for r in c["seeds"].values()
                                  if r["run_key"] in data.curves], colour_of.get(name, "grey"), 1.3))
        for row, key in enumerate(keys):
            ax = axes[row][col]
            for z, (name, runs, colour, width) in enumerate(series):
                if runs:
                    xs, ys = _mean_curve(runs, key)
                    ax.plot(xs, ys, color=colour, linewidth=width, marker="o", markersize=2.5,
                            zorder=len(series) + 2 if z == 0 else 2,
                            label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
            ax.set_title(f"{stage} ({st['budget_steps']} steps)" if row == 0 else "", fontsize=10)
            ax.set_xlabel("step" if row == 1 else "")
            ax.set_ylabel(key if col == 0 else "")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{round_name} · {label}: validation curves, baseline (black) vs candidates")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------------------
def _summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=1, allow_nan=False) + "\n"


def write_report(round_dir: Path, rule: DecisionRule | None = None) -> Path:
    """Write <round>/report/{report.md, summary.json, summary.txt, *.png}; returns the report.md path."""
    round_dir = Path(round_dir)
    data = load_round(round_dir)
    summary = build_summary(data, rule)
    out = round_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    write_plots(summary, data, out)
    (out / "summary.json").write_text(_summary_json(summary), encoding="utf-8")
    (out / "summary.txt").write_text(render_text(summary), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(summary), encoding="utf-8")
    return out / "report.md"


def check_report(round_dir: Path) -> list[str]:
    """Recompute the report from the records; one message per mismatch or missing record (empty = consistent)."""
    round_dir = Path(round_dir)
    out = round_dir / REPORT_DIR
    try:
        stored = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{out / 'summary.json'}: no report (run `fsearch report` first)"]
    except json.JSONDecodeError as e:
        return [f"{out / 'summary.json'}: not valid JSON ({e.msg}, line {e.lineno})"]
    try:
        data = load_round(round_dir)
    except ReportError as e:
        return [f"records: {e}"]
    r = stored.get("rule") or {}
    rule = DecisionRule(**{k: r[k] for k in ("alpha", "confidence", "min_pairs") if k in r})
    fresh = build_summary(data, rule)
    messages = [f"integrity: {p['message']}" for p in fresh["problems"]]
    changed = _diff_records(stored.get("records") or {}, fresh["records"], messages)
    if stored.get("records_file", {}).get("sha256") != fresh["records_file"]["sha256"]:
        then = stored.get("records_file", {}).get("count")
        messages.append(f"records.jsonl changed since the report was written ({then} records then, "
                        f"{fresh['records_file']['count']} now)")
    ignore = {"records", "problems", "records_file"}
    _diff_values({k: v for k, v in stored.items() if k not in ignore},
                 {k: v for k, v in fresh.items() if k not in ignore}, "", [], changed, messages)
    for name, render in (("report.md", render_markdown), ("summary.txt", render_text)):
        messages += _diff_file(out / name, render(fresh))
    for p in fresh["plots"]:
        if not (out / p["file"]).is_file():
            messages.append(f"{out / p['file']}: plot missing")
    return messages


def _diff_records(stored: dict[str, Any], fresh: dict[str, Any], messages: list[str]) -> set[str]:
    changed = set()
    for key, old in stored.items():
        new = fresh.get(key)
        if new is None:
            messages.append(f"missing record {key}: cited by the report, not in records.jsonl")
            changed.add(key)
            continue
        for f, v in old.items():
            if not _same(v, new.get(f)):
                messages.append(f"record {key}: {f} is {_show(v)} in the report but {_show(new.get(f))} in "
                                f"records.jsonl")
                changed.add(key)
    for key in fresh:
        if key not in stored:
            messages.append(f"record {key}: in records.jsonl but not in the report (the report is stale)")
            changed.add(key)
    return changed


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return _close(float(a), float(b))
        return False
    return a == b


def _show(v: Any, limit: int = 160) -> str:
    text = f"{v:.6g}" if isinstance(v, float) else repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _diff_values(a: Any, b: Any, path: str, sources: list[str], changed: set[str], messages: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        src = a.get("sources") if isinstance(a.get("sources"), list) else sources
        for k in a:
            if k == "sources":
                continue
            sub = f"{path}.{k}" if path else k
            if k not in b:
                messages.append(f"{sub}: in the report but not derivable from the records{_named(src, changed)}")
            else:
                _diff_values(a[k], b[k], sub, src, changed, messages)
        for k in b:
            if k not in a and k != "sources":
                sub = f"{path}.{k}" if path else k
                messages.append(f"{sub}: derivable from the records but missing in the report"
                                f"{_named(b.get('sources') or src, changed)}")
        return
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and not all(
            isinstance(x, (int, float, str, type(None))) for x in a + b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff_values(x, y, f"{path}[{i}]", sources, changed, messages)
        return
    if not _same(a, b):
        messages.append(f"{path}: report says {_show(a)}, records give {_show(b)}{_named(sources, changed)}")


def _named(sources: list[str], changed: set[str]) -> str:
    keys = [k for k in sources if k in changed] or list(sources)
    if not keys:
        return ""
    more = f" and {len(keys) - MAX_NAMED_SOURCES} more" if len(keys) > MAX_NAMED_SOURCES else ""
    return f" (record{'s' if len(keys) > 1 else ''} {', '.join(keys[:MAX_NAMED_SOURCES])}{more})"


def _diff_file(path: Path, expected: str) -> list[str]:
    try:
        actual = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [f"{path}: missing"]
    if actual == expected:
        return []
    a, e = actual.splitlines(), expected.splitlines()
    hunks = [op for op in difflib.SequenceMatcher(None, a, e, autojunk=False).get_opcodes() if op[0] != "equal"]
    changed = sum(max(i2 - i1, j2 - j1) for _, i1, i2, j1, j2 in hunks)
    out = [f"{path.name}: {changed} line(s) differ from what the records give"]
    for _, i1, i2, j1, j2 in hunks[:MAX_DIFF_LINES]:
        has = " / ".join(a[i1:i2][:2]) or "<nothing>"
        give = " / ".join(e[j1:j2][:2]) or "<nothing>"
        out.append(f"{path.name} line {i1 + 1}: has {_show(has, 240)}, records give {_show(give, 240)}")
    return out
