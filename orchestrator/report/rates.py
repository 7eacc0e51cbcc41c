"""The protocol's error rates for the round as run (`fsearch report --rates`): orchestrator.simulate runs the round's
own spec through the real planner and decision code, many times, under the noise this round measured (each task's
paired-delta SDs and each stage's wall time, simulate.noise_from_round), once with every candidate null and once
with one candidate at +1 SD. A fixed replicate count and seed make the numbers a pure function of the records and
the spec, so `fsearch report --check` re-derives them exactly."""
from __future__ import annotations

from typing import Any

from orchestrator.errors import UserError, one_line
from orchestrator.report.load import RoundData

RATES_REPLICATES = 200  # per scenario: Monte-Carlo SE about 3 points on a power near 50%, a few seconds in all
RATES_SEED = 0
RATES_EFFECT_SD = 1.0  # the real candidate's effect, in SDs of its task's seed-check paired delta
RESULT_FIELDS = ("p_confirm_null", "fwer", "power", "false_share", "runs_per_candidate", "cost_per_candidate")


def protocol_rates(data: RoundData, replicates: int = RATES_REPLICATES, seed: int = RATES_SEED) -> dict[str, Any]:
    """The simulated rates of the round's protocol under its measured noise (or why there are none), as JSON data."""
    from orchestrator import simulate as sim

    out: dict[str, Any] = {"replicates": replicates, "seed": seed, "effect_sd": RATES_EFFECT_SD}
    if data.spec is None:
        return out | {"error": "no readable spec.yaml: there is no protocol to simulate"}
    try:
        noise = sim.noise_from_round(data.round_dir)
    except UserError as e:
        return out | {"error": one_line(e).replace("--noise-from ", "")}
    protocol = sim.Protocol.from_spec(data.spec)
    model = sim.model_from_noise(data.spec, noise)
    n = max(len(data.spec.candidates(label)) for label in data.spec.tasks)
    scenarios = {"null": sim.Scenario.null(), "one_real": sim.Scenario.one_real(n, RATES_EFFECT_SD)}
    out["noise"] = {"task_sd": noise.task_sd, "wall_s": noise.wall_s, "notes": noise.notes}
    out["med_run_s"] = sim.med_unit(protocol, model)
    for name, scenario in scenarios.items():
        result = sim.simulate(protocol, model, scenario, replicates, seed)
        row = {f: getattr(result, f).as_dict() for f in RESULT_FIELDS}
        out[name] = {"scenario": scenario.name, **row}
    return out
