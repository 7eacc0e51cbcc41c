"""report.md: the round's results per task (matched baselines, each stage's candidates with deltas and decisions,
the seed-check table, noise, compute per stage and what pruning saved) and the decision rule, from the summary."""
from __future__ import annotations

from typing import Any

from orchestrator.decisions import SEEDCHECK
from orchestrator.report.build import seed_key
from orchestrator.report.formatting import SD_LABEL, markdown_table, number_or_dash, p_value, seconds

# what makes two runs "one configuration" for the repeats check (build.CONFIGURATION_FIELDS), in words
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
    lines += _mixed_conditions_markdown(s) + _sandbox_markdown(s)
    rep = s["repeats"]
    if rep["differing"]:
        lines += ["## Not reproducible", "", f"{rep['differing']} of {len(rep['groups'])} configurations that ran in "
                  f"more than one stage {_SAME_CONFIGURATION} gave different final metrics. A run should be a "
                  "measurement: find the nondeterminism (or the code change during the round) before trusting any "
                  "number below.", ""]
        lines += markdown_table(["task", "candidate", "seed", "runs", "values"],
                                [[f"`{g['task']}`", g["candidate"], g["seed"],
                                  ", ".join(f"`{k}`" for k in g["run_keys"]),
                                  ", ".join(number_or_dash(v, ".6g") for v in g["values"])]
                                 for g in rep["groups"] if not g["identical"]])
        lines.append("")
    lines += [_seed_controls_text(s), "", f"Spreads: every SD in this report is the {SD_LABEL}, the spread of the "
              f"values over seeds; summary.txt prints the same as `sd(n-1)`. Validation values (`val_<metric>`, "
              f"what the rules select on) and held-out test values (`test_<metric>`, from the same final model) are "
              f"shown side by side.", ""]
    if s.get("protocol"):
        lines += ["## Protocol", "", "The decision rules of this round, stage by stage (orchestrator/decisions.py):",
                  ""] + [f"- {line}" for line in s["protocol"]] + [""]
    lines += ["## Decision rule (seed check)", "", s["rule"]["text"], ""]
    comparison = s.get("kind") == "comparison"
    if comparison:
        lines += ["A comparison round: the seed check is its only stage. Every candidate of every task runs on every "
                  "seed against the matched baseline of that seed (same stage, seed, batch and budget); nothing is "
                  "screened or pruned; the task's threshold enters only the decision rule above.", ""]
    elif not s.get("protocol"):  # else the protocol section above states each stage's rule
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
    lines += markdown_table(["task", "kind", "metric", "threshold", "status", "stages run", "candidates", "finalists",
                     "confirmed", "inconclusive", "rejected"], rows)
    c = s["compute"]
    if comparison:
        cost = (f"Compute (sum of run wall times): spent {seconds(c['spent_wall_s'])} s; the whole round (every "
                f"candidate and the baseline on every seed, nothing pruned) costs about {seconds(c['full_wall_s'])} s.")
    else:
        cost = (f"Compute (sum of run wall times): spent {seconds(c['spent_wall_s'])} s; running every candidate "
                f"through every stage would have cost about {seconds(c['full_wall_s'])} s; pruning saved about "
                f"{seconds(c['saved_wall_s'])} s"
                + (f" ({c['saved_fraction']:.0%})." if c["saved_fraction"] is not None else "."))
    lines += ["", cost
              + (f" No estimate for {', '.join(c['tasks_without_estimate'])} (a stage that never ran and no finished "
                 f"run to take a time per step from); those tasks are left out of the estimate and the saving."
                 if c["tasks_without_estimate"] else ""), ""]
    lines += _rates_markdown(s)
    if rep["groups"] and not rep["differing"]:
        lines += [f"Reproducibility: {len(rep['groups'])} configuration(s) ran in more than one stage "
                  f"{_SAME_CONFIGURATION}; every repeat gave bit-identical final metrics.", ""]
    for label, t in s["tasks"].items():
        lines += _task_markdown(label, t, s)
    return "\n".join(lines).rstrip() + "\n"


def _rates_markdown(s: dict[str, Any]) -> list[str]:
    r = s.get("rates")
    head = ["## Error rates of this protocol (simulated)", ""]
    if r is None:
        return head + [f"Not computed: `fsearch report {s['round']} --rates` runs this round's spec through the "
                       "simulator (the real planner and decision code) under the noise measured in these records, "
                       "and adds here how often such a protocol confirms a candidate with no effect and one with a "
                       "+1 SD effect (a few seconds).", ""]
    if r.get("error"):
        return head + [f"Not available: {r['error']}.", ""]
    lines = head + [
        f"What the decisions above are worth: `orchestrator.simulate` ran this round's spec ({r['replicates']} "
        f"simulated rounds per row, seed {r['seed']}) through the same planner and decision code, with each task's "
        f"paired-delta {SD_LABEL} and each stage's run wall time as measured in these records; effects are in units "
        f"of the task's seed-check paired-delta SD. ± is the Monte-Carlo standard error. Device-seconds count every "
        f"run, baselines included; one med run is {seconds(r['med_run_s'])} s.", ""]
    rows = []
    real = f"the first candidate of each task at +{r['effect_sd']:g} SD"
    for key, title in (("null", "every candidate null"), ("one_real", real)):
        x = r[key]
        cost = x["cost_per_candidate"]["value"]
        rows.append([title, _pct(x["p_confirm_null"]), _pct(x["fwer"]), _pct(x["power"]), _pct(x["false_share"]),
                     number_or_dash(x["runs_per_candidate"]["value"], ".2f"),
                     "—" if cost is None else f"{seconds(cost)} ({cost / r['med_run_s']:.2f} med runs)"])
    lines += markdown_table(["scenario", "P(confirm) per null candidate", "P(any null confirmed)",
                             "power (P(confirm) of the real one)", "share of confirmations that are false",
                             "runs per candidate", "device-s per candidate"], rows)
    lines += ["", "Noise used: " + "; ".join(r["noise"]["notes"]) + ".", ""]
    return lines


def _pct(e: dict[str, Any]) -> str:
    return "—" if e["value"] is None else f"{100 * e['value']:.1f}% ± {100 * (e['se'] or 0.0):.1f}"


def _mixed_conditions_markdown(s: dict[str, Any]) -> list[str]:
    rows = s.get("mixed_conditions") or []
    if not rows:
        return []
    lines = ["## Runs of different conditions: NOT POOLED", "",
             f"**{len(rows)} run(s) below share a task, stage, candidate and seed with runs of other conditions** "
             "(another budget, eval cadence, batch, n_val, data seed or setup: a different run key for the same slot, "
             "typically from a spec edited between invocations). They are not pooled with the runs this report "
             "summarises (the current spec's runs, or without a readable spec the conditions of each stage's latest "
             "run) and enter no mean, SD or decision below. Start a new round for new conditions.", ""]
    lines += markdown_table(["task", "stage", "candidate", "seed", "run", "conditions", "status", "value"],
                            [[f"`{r['task']}`", r["stage"], r["candidate"], r["seed"], f"`{r['run_key']}`",
                              r["conditions"], r["status"], number_or_dash(r["value"])] for r in rows])
    return lines + [""]


def _sandbox_markdown(s: dict[str, Any]) -> list[str]:
    sb = s.get("sandbox") or {"modes": {}, "unsafe_runs": []}
    modes = ", ".join(f"{mode}: {n} run(s)" for mode, n in sb["modes"].items()) or "no runs"
    if not sb["unsafe_runs"]:
        return [f"Sandbox (how model-written code ran, from the records' `sandbox`): {modes}.", ""]
    keys = ", ".join(f"`{k}`" for k in sb["unsafe_runs"])
    return ["## SANDBOX OFF: model-written code ran unconfined", "",
            f"**{len(sb['unsafe_runs'])} run(s) executed model-written code with `sandbox: unsafe`** (no namespace "
            f"boundary: the code could read and write anything the worker could): {keys}. Sandbox modes over the "
            f"round: {modes}.", ""]


def _seed_controls_text(s: dict[str, Any]) -> str:
    sc = s.get("seed_controls") or {}
    words = {"data_order": "the data order", "data_order+init": "the data order and the initialisation",
             "not recorded": "not recorded (records from before seeds could set the initialisation: every "
                             "from-scratch seed shared one initialisation)"}
    parts = [f"{words.get(k, k)} in {n} run(s)" for k, n in sc.items()]
    return "What a run's seed varied: " + ("; ".join(parts) if parts else "no runs") + "."


def _fates_markdown(t: dict[str, Any]) -> list[str]:
    fates = t.get("fates") or {}
    if not fates:
        return []
    rows = []
    for name, f in fates.items():
        kind = "control" if f["control"] else ("FS" if f["mode"] == "prompt_fs" else (f["mode"] or "—"))
        rows.append([name, kind, f["reached"] or "—", f["outcome"] or "—", f["reason"] or "—",
                     "; ".join(f["failed_runs"]) or "—"])
    return ["### What happened to each candidate", "",
            *markdown_table(["candidate", "kind", "last stage", "outcome", "why", "failed runs"], rows), ""]


def _task_markdown(label: str, t: dict[str, Any], s: dict[str, Any]) -> list[str]:
    lines = [f"## Task `{label}`", "",
             f"Kind `{t['task_kind']}`, decision metric final `val_{t['metric']}` (higher is better), threshold "
             f"{t['threshold']:g}; candidates: {', '.join(t['candidates']) or '—'}. Status: {t['status']}.", ""]
    lines += _fates_markdown(t)
    lines += _baselines_markdown(t)
    for stage, st in t["stages"].items():
        lines += _stage_markdown(stage, st, t["metric"])
    lines += _seedcheck_markdown(t, s["rule"])
    lines += _noise_markdown(t)
    if t["failed_runs"]:
        lines += ["### Failed runs", ""]
        lines += markdown_table(["run", "stage", "candidate", "seed", "status", "error"],
                                [[f"`{r['run_key']}`", r["stage"], r["candidate"], r["seed"], r["status"],
                                  f"{r['error_kind'] or '-'}: {r['error_message'] or '-'}"] for r in t["failed_runs"]])
        lines.append("")
    lines += _compute_markdown(t, comparison=s.get("kind") == "comparison")
    plots = [p for p in s["plots"] if p["task"] == label]
    if plots:
        lines += ["### Plots", ""]
        for p in plots:
            lines += [f"![{p['kind']} {label}]({p['file']})", "", f"*{p['caption']}*", ""]
    return lines


def _baselines_markdown(t: dict[str, Any]) -> list[str]:
    rows = []
    for stage, st in t["stages"].items():
        for b in st["baselines"].values():
            rows.append([stage, b["seed"], f"`{b['run_key']}`", b["status"], number_or_dash(b["value"]),
                         number_or_dash(b.get("test_value")), number_or_dash(b["val_loss"]),
                         f"{b['steps']}/{st['budget_steps']}",
                         f"{b['batch_size']} ({b['micro_batch']})", seconds(b["wall_s"])])
    table = markdown_table(["stage", "seed", "run", "status", f"val {t['metric']}", f"test {t['metric']}",
                            "val_loss", "steps/budget",
                            "batch (micro)", "wall s"], rows) if rows else ["No baseline records."]
    return ["### Matched baselines", "", *table, ""]


def _stage_markdown(stage: str, st: dict[str, Any], metric: str) -> list[str]:
    seeds = ", ".join(str(x) for x in st["seeds"])
    lines = [f"### Stage `{stage}`", "",
             f"{st['budget_steps']} steps, eval every {st['eval_every']}, batch {st['batch_size']}, "
             f"n_val {st['n_val']}, seeds {seeds}.", ""]
    rows = []
    for name, cand in st["candidates"].items():
        for r in cand["seeds"].values():
            rows.append([name, r["seed"], f"`{r['run_key']}`", r["status"], number_or_dash(r["value"]),
                         number_or_dash(r["baseline_value"]), number_or_dash(r["delta"], "+.4f"),
                         number_or_dash(r.get("test_delta"), "+.4f"), r["record_decision"]])
        if len(st["seeds"]) > 1 and stage != SEEDCHECK:
            rows.append([f"**{name}**", "mean", "", "", "", "", number_or_dash(cand["mean_delta"], "+.4f"),
                         number_or_dash(cand.get("mean_test_delta"), "+.4f"), f"**{cand['stage_decision']}**"])
    if rows:
        lines += markdown_table(["candidate", "seed", "run", "status", f"val {metric}", "baseline", "val delta",
                                 "test delta", "decision"], rows)
    else:
        lines.append("No candidate records.")
    if stage != SEEDCHECK:
        kept = [n for n, c in st["candidates"].items() if c["stage_decision"] == "promote"]
        pruned = [n for n, c in st["candidates"].items() if c["stage_decision"] == "prune"]
        lines += ["", f"Promoted: {', '.join(kept) or 'none'}. Pruned: {', '.join(pruned) or 'none'}."]
    lines.append("")
    return lines


def _seedcheck_markdown(t: dict[str, Any], rule: dict[str, Any]) -> list[str]:
    fin = t["seedcheck"]["finalists"]
    if not fin:
        return []
    seeds = t["seedcheck"]["seeds"]
    sequential = all(f.get("rule") == "sequential" for f in fin.values())
    family = ("sequential check: looks of fresh seeds, decided by the planner (protocol above)" if sequential else
              f"Holm family: all {rule['family_size']} finalist(s) of the round")
    lines = ["### Seed check", "", f"Paired deltas over seeds {', '.join(str(x) for x in seeds)}; {family}.", ""]
    alpha = rule["alpha"]
    if 2.0 ** -len(seeds) >= alpha and not sequential:  # the fixed rule's sign-flip veto
        need = next(n for n in range(1, 64) if 2.0 ** -n < alpha)
        lines += [f"**With {len(seeds)} seeds no finalist can be confirmed:** the one-sided sign-flip p-value "
                  f"cannot go below 2^-{len(seeds)} = {2.0 ** -len(seeds):.4g} ≥ {alpha:g}; at least {need} "
                  f"seeds are needed.", ""]
    rows = []
    for name, f in fin.items():
        per_seed = " ".join(number_or_dash(f["deltas"].get(seed_key(x)), "+.4f") for x in seeds)
        ci = "—" if f.get("ci_low") is None else f"[{f['ci_low']:+.4f}, {f['ci_high']:+.4f}]"
        rows.append([name, f["n"], per_seed, number_or_dash(f.get("mean"), "+.4f"), ci,
                     number_or_dash(f.get("sd")), f"{f.get('wins', 0)}/{f['n']}", p_value(f.get("p_t_two_sided")),
                     p_value(f["p_t_holm"]), p_value(f.get("p_sign_flip_greater")),
                     p_value(f.get("p_sign_flip_two_sided")), p_value(f.get("p_wilcoxon_greater")),
                     f"**{f['decision']}**"])
    lines += markdown_table(["candidate", "n", "delta per seed", "mean", "95% t-interval", SD_LABEL, "wins",
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
        if f.get("rule") == "sequential":
            exact = (f" Sequential check on the {f['metric']} metric (the table's statistics are on it); validation "
                     f"deltas on the same seeds: " + ", ".join(number_or_dash(v, "+.4f") for v in
                                                                f["val_deltas"].values()) + ".")
        lines.append(f"- `{name}`{' (control)' if f.get('control') else ''}: {f['decision']} — {f['reason']}."
                     f"{extra}{exact}")
    for v in t["seedcheck"].get("versus_control", []):
        ci = "" if v.get("ci_low") is None else f", 95% t-interval [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]"
        lines.append(f"- `{v['candidate']}` against the control `{v['control']}` on the {v['n']} seed(s) both have: "
                     + (f"mean difference {v['mean']:+.4f}{ci}, one-sided t p {p_value(v.get('p_t_greater'))}, "
                        f"sign-flip p {p_value(v.get('p_sign_flip_greater'))}" if v["n"] else "no common seed")
                     + ".")
    lines.append("")
    return lines


def _compute_markdown(t: dict[str, Any], comparison: bool) -> list[str]:
    comp = t["compute"]
    rows = [[stage, c["runs"], seconds(c["wall_s"]), seconds(c["mean_wall_s"]), c.get("decisions", "—"),
             seconds(c.get("wall_per_decision_s")), c["full_runs"], seconds(c["full_wall_s"]), c["estimate_basis"]]
            for stage, c in comp["stages"].items()]
    lines = ["### Compute", ""]
    lines += markdown_table(["stage", "runs", "wall s", "mean s/run", "decisions", "wall s per decision",
                             "runs if nothing pruned", "wall s if nothing pruned", "estimate from"], rows)
    lines += ["", "Wall s per decision: the stage's run wall time (device-seconds, baselines included) over the "
                  "candidates decided there."]
    spent = f"Spent {seconds(comp['spent_wall_s'])} s; every candidate ({len(t['candidates'])}) plus the baseline"
    if comparison:
        lines += ["", f"{spent} on every seed (a comparison round: nothing pruned): about "
                      f"{seconds(comp['full_wall_s'])} s.", ""]
    else:
        lines += ["", f"{spent} through every stage: about {seconds(comp['full_wall_s'])} s; pruning saved about "
                      f"{seconds(comp['saved_wall_s'])} s"
                  + (f" ({comp['saved_fraction']:.0%})." if comp["saved_fraction"] is not None else "."), ""]
    return lines


def _noise_markdown(t: dict[str, Any]) -> list[str]:
    n = t.get("noise")
    if not n:
        return []
    parts = []
    if n["baseline_sd"] is not None:
        parts.append(f"over the seed check's {n['baseline_n']} seeds the baseline's {t['metric']} has a {SD_LABEL} "
                     f"of {n['baseline_sd']:.4f}")
    if n["delta_sd"]:
        parts.append(f"the paired deltas' {SD_LABEL} is " + ", ".join(
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


