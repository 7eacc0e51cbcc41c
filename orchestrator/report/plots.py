"""The report's plots: per task, the deltas against the matched baselines and the validation curves (PNG).
matplotlib is imported only when a plot is drawn, with the Agg backend."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from orchestrator.decisions import SEEDCHECK
from orchestrator.report.load import RoundData

DECISION_COLOURS = {"confirmed": "#2ca02c", "inconclusive": "#ff7f0e", "rejected": "#d62728",
                    "promote": "#1f77b4", "prune": "#7f7f7f", "pending": "#bcbd22", "recorded": "#9467bd"}


def file_safe_name(name: str) -> str:
    """A task label as part of a file name: characters other than letters, digits, '-', '_' and '.' become '_'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


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


def plot_list(summary: dict[str, Any], data: RoundData) -> list[dict[str, str]]:
    plots = []
    for label, task in summary["tasks"].items():
        has_deltas = any(c["mean_delta"] is not None for st in task["stages"].values()
                         for c in st["candidates"].values())
        if has_deltas:
            plots.append({"task": label, "kind": "deltas", "file": f"deltas_{file_safe_name(label)}.png",
                          "caption": _caption_deltas(task)})
        keys = [s["run_key"] for st in task["stages"].values() for s in st["baselines"].values()]
        keys += [s["run_key"] for st in task["stages"].values() for c in st["candidates"].values()
                 for s in c["seeds"].values()]
        if any(k in data.curves for k in keys):
            plots.append({"task": label, "kind": "curves", "file": f"curves_{file_safe_name(label)}.png",
                          "caption": _caption_curves(task)})
    return plots


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


