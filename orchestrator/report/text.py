"""summary.txt: the round's results in the original system's text formats (its round summary, then its multi-seed
paired format), from the summary."""
from __future__ import annotations

import math
from typing import Any

from orchestrator.decisions import SEEDCHECK
from orchestrator.report.build import seed_key
from orchestrator.report.formatting import (SD_LABEL_ASCII, mean_or_none, number_or_dash, p_value, percent,
                                            percentage_points)
from orchestrator.stats import sample_sd

TEXT_RULE_WIDTH = 108  # the original's `=`/`-` rules


def render_text(summary: dict[str, Any]) -> str:
    s = summary
    out = [f"# fsearch round {s['round']}: the original's summary formats (R22-R27 round format, then the "
           f"multi-seed paired format)",
           "# acc = final val_<metric> on the fixed validation set (the task's decision metric), loss = final "
           "val_loss, both from the same (final) eval;",
           "# d_acc = candidate - matched baseline of the SAME stage and seed (never the quick baseline); "
           "[KEEP|PRUNE] = promotion at that stage;",
           "# stages with several seeds show means over seeds; quick/med/long are screens (KEEP|PRUNE), not "
           "confirmations: only the seed check's decision says CONFIRMED, by report.md's rule;",
           f"# {SD_LABEL_ASCII} = sample standard deviation (n - 1 in the denominator), as in report.md; "
           "fs= is a Future-Seed candidate's value, read_twice= the read-twice control's."]
    if s.get("mixed_conditions"):
        out.append(f"# MIXED CONDITIONS: {len(s['mixed_conditions'])} run(s) share a (task, stage, candidate, seed) "
                   f"with runs of other conditions; they are set apart, never pooled (report.md lists them)")
    unsafe = (s.get("sandbox") or {}).get("unsafe_runs") or []
    if unsafe:
        out.append(f"# SANDBOX OFF: {len(unsafe)} run(s) executed model-written code with sandbox: unsafe")
    if s["repeats"]["differing"]:
        out.append(f"# NOT REPRODUCIBLE: {s['repeats']['differing']} configuration(s) that ran in more than one stage "
                   f"gave different final metrics (report.md lists them)")
    for label, t in s["tasks"].items():
        out += ["=" * TEXT_RULE_WIDTH, f"[{label}]"]
        if t["status"].startswith("failed") or not t["stages"]:
            out.append("  baseline failed or missing" + (f": {t['status']}" if t["status"] != "ok" else ""))
        for stage, st in t["stages"].items():
            if stage != SEEDCHECK:
                out += _round_format_stage(stage, st)
        out += _round_format_seedcheck(t)
        out.append("-" * TEXT_RULE_WIDTH)
    out += _paired_format(s)
    return "\n".join(out) + "\n"


def value_label(candidate: dict[str, Any]) -> str:
    """The original's `fs=` names a Future-Seed candidate's value; another mode's value is named by its mode."""
    mode = candidate.get("mode")
    return "fs" if mode in (None, "prompt_fs") else str(mode)


def _round_format_stage(stage: str, st: dict[str, Any]) -> list[str]:
    """One screening stage in the original's round format: the baseline, then candidates best delta first."""
    out: list[str] = []
    bvals = [b["value"] for b in st["baselines"].values() if b["value"] is not None]
    blosses = [b["val_loss"] for b in st["baselines"].values() if b["val_loss"] is not None]
    if not bvals:
        return out  # the task's failure line above says why
    out.append(f"  baseline {stage}: acc={percent(mean_or_none(bvals))} "
               f"loss={number_or_dash(mean_or_none(blosses))} "
               f"bsz={st['batch_size']}")
    cands = sorted(st["candidates"].items(),
                   key=lambda kv: -math.inf if kv[1]["mean_delta"] is None else -kv[1]["mean_delta"])
    if stage != "quick":
        n = len(st["seeds"])
        out.append(f"  {stage} screen ({n} seed{'s' if n != 1 else ''}):")
    for name, c in cands:
        vals = [r["value"] for r in c["seeds"].values() if r["value"] is not None]
        losses = [r["val_loss"] for r in c["seeds"].values() if r["val_loss"] is not None]
        tag = {"promote": "KEEP", "prune": "PRUNE"}.get(c["stage_decision"], c["stage_decision"].upper())
        loss_part = f" loss={number_or_dash(mean_or_none(losses))}" if stage != "quick" else ""
        out.append(f"    {name:24s} d_acc={percentage_points(c['mean_delta'])} "
                   f"acc={percent(mean_or_none(vals))}{loss_part} [{tag}] "
                   f"test_d_acc={percentage_points(c['mean_test_delta'])}")
    return out


def _round_format_seedcheck(t: dict[str, Any]) -> list[str]:
    """The task's seed-check finalists in the original's round format."""
    out: list[str] = []
    sc = t["stages"].get(SEEDCHECK)
    for name, f in t["seedcheck"]["finalists"].items():
        out.append(f"  seedcheck {name}:")
        for seed in t["seedcheck"]["seeds"]:
            r = sc["candidates"][name]["seeds"].get(seed_key(seed)) if sc else None
            if r is None:
                out.append(f"    seed={seed}: missing")
                continue
            out.append(f"    seed={seed}: baseline={percent(r['baseline_value'])} "
                       f"{value_label(sc['candidates'][name])}={percent(r['value'])} "
                       f"d_acc={percentage_points(r['delta'])} test_d_acc={percentage_points(r.get('test_delta'))}")
        out.append(f"    mean d_acc={percentage_points(f.get('mean'))}, positive_seeds={f.get('wins', 0)}/{f['n']}")
        ci = "n/a" if f.get("ci_low") is None else \
            f"[{percentage_points(f['ci_low'])}, {percentage_points(f['ci_high'])}]"
        out.append(f"    95% CI {ci} p_t_holm={p_value(f['p_t_holm'])} "
                   f"p_signflip_1sided={p_value(f.get('p_sign_flip_greater'))} decision={f['decision'].upper()}")
    return out


def _paired_format(s: dict[str, Any]) -> list[str]:
    """Every finalist in the original's multi-seed paired format (filter line, pair statistics, one line a seed)."""
    out: list[str] = []
    for label, t in s["tasks"].items():
        sc = t["stages"].get(SEEDCHECK)
        for name, f in t["seedcheck"]["finalists"].items():
            filt = {"round": s["round"], "task": label, "stage": SEEDCHECK, "candidate": name, "metric": t["metric"],
                    "steps": sc["budget_steps"], "bsz": sc["batch_size"], "seeds": t["seedcheck"]["seeds"]}
            rows = [r for r in sc["candidates"][name]["seeds"].values() if r["delta"] is not None]
            d = [r["delta"] for r in rows]
            dl = [r["delta_loss"] for r in rows if r["delta_loss"] is not None]
            sign = (sum(x > 0 for x in d), sum(x == 0 for x in d), sum(x < 0 for x in d))
            value_name = value_label(sc["candidates"][name])
            out += ["", f"filter: {filt!r}", "-" * TEXT_RULE_WIDTH,
                    f"pairs={len(d)} mean d_acc={number_or_dash(mean_or_none(d), '+.4f')} "
                    f"{SD_LABEL_ASCII}={number_or_dash(sample_sd(d))} | "
                    f"mean d_loss={number_or_dash(mean_or_none(dl), '+.4f')} "
                    f"{SD_LABEL_ASCII}={number_or_dash(sample_sd(dl))} | "
                    f"sign(+/0/-)={sign[0]}/{sign[1]}/{sign[2]}"]
            for r in rows:
                out.append(f"  seed={r['seed']} d_acc={r['delta']:+.4f} (no={r['baseline_value']:.4f} "
                           f"{value_name}={r['value']:.4f}) d_loss={number_or_dash(r['delta_loss'], '+.4f')} "
                           f"test_d_acc={'n/a' if r.get('test_delta') is None else format(r['test_delta'], '+.4f')}")
    return out
