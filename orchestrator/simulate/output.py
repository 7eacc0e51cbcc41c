"""`fsearch simulate`: the comparison it runs, its table (or JSON) and the power-against-cost PNG."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

from orchestrator.simulate.model import OutcomeModel, Protocol, Scenario, default_protocol, original_protocol
from orchestrator.simulate.noise import model_from_noise, noise_from_round
from orchestrator.simulate.run import Estimate, ScenarioResult, compare, med_unit


def format_results(results: Sequence[ScenarioResult], units: Mapping[str, float]) -> str:
    head = (f"{'protocol':<14} {'scenario':<16} {'P(confirm|null)':>17} {'family-wise':>15} {'power':>15} "
            f"{'false share':>15} {'runs/cand':>11} {'med-eq/cand':>12}")
    lines = [head, "-" * len(head)]
    for r in results:
        u = units.get(r.protocol, 1.0)
        cost = Estimate(r.cost_per_candidate.value / u, (r.cost_per_candidate.se or 0.0) / u)
        lines.append(f"{r.protocol:<14} {r.scenario.name:<16} {r.p_confirm_null.pct():>17} {r.fwer.pct():>15} "
                     f"{r.power.pct():>15} {r.false_share.pct():>15} {r.runs_per_candidate.num():>11} "
                     f"{cost.num():>12}")
    return "\n".join(lines)


def plot_power_cost(results: Sequence[ScenarioResult], units: Mapping[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r.power.value is None:
            continue
        u = units.get(r.protocol, 1.0)
        ax.errorbar(r.cost_per_candidate.value / u, r.power.value, yerr=r.power.se, fmt="o")
        ax.annotate(f"{r.protocol} ({r.scenario.name})", (r.cost_per_candidate.value / u, r.power.value),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("cost per candidate (med-run equivalents, baselines included)")
    ax.set_ylabel("P(confirm | real effect)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_command(spec_files: Sequence[str], noise_from: str | None, effects: Sequence[float], candidates: int,
                replicates: int, seed: int, as_json: bool, png: str | None, threshold: float) -> str:
    """`fsearch simulate`: the text (or JSON) it prints; writes the PNG when asked."""
    import json
    import time

    from orchestrator.spec import find_spec_file, load_spec

    protocols = []
    for arg in spec_files:
        spec = load_spec(find_spec_file(arg))
        protocols.append(Protocol.from_spec(spec, name=Path(arg).stem))
    if not protocols:  # before and after: the original's protocol (ports pin it) and the default one
        protocols = [original_protocol(candidates, threshold), default_protocol(candidates, threshold)]
    noise = noise_from_round(noise_from) if noise_from else None

    def model_for(p: Protocol) -> OutcomeModel:
        return model_from_noise(p.spec, noise) if noise else OutcomeModel.uniform(p.spec)

    n_max = max(len(p.spec.candidates(t)) for p in protocols for t in p.spec.tasks)
    scenarios = [Scenario.null()] + [Scenario.one_real(n_max, e) for e in effects if e != 0]
    t0 = time.perf_counter()
    results = compare(protocols, model_for, scenarios, replicates, seed)
    units = {p.name: med_unit(p, model_for(p)) for p in protocols}
    if png:
        plot_power_cost(results, units, Path(png))
    if as_json:
        return json.dumps({"replicates": replicates, "seed": seed,
                           "noise": dataclasses.asdict(noise) if noise else "uniform: paired-delta SD 1 per stage",
                           "med_run_s": units,
                           "results": [r.as_dict() for r in results]}, indent=2)
    out = [f"{replicates} replicates per row, seed {seed}; effects in SDs of the seed-check paired delta; "
           f"{time.perf_counter() - t0:.1f} s"]
    if noise:
        out += ["noise from " + noise_from + ":"] + ["  " + n for n in noise.notes]
        out.append("  wall s per stage (median): " + ", ".join(f"{s} {w:.1f}" for s, w in noise.wall_s.items()))
    else:
        out.append("noise: paired-delta SD 1 at every stage, the same effect at every stage; quick run = 0.4 med")
    out += ["", format_results(results, units)]
    if png:
        out.append(f"\npower against cost: {png}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m orchestrator.simulate`: the default protocol, printed (for a quick look without the CLI)."""
    print(run_command([], None, [0.5, 1.0], 8, 2000, 0, False, None, 0.0))
    return 0
