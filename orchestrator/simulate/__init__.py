"""`fsearch simulate`: the error rates and cost of a round's protocol, measured by running the real planner and the
real seed-check rule against synthetic outcomes, many times over.

    protocol = default_protocol()                     # or Protocol.from_spec(load_spec("studies/x.yaml"))
    model = OutcomeModel.uniform(protocol.spec)       # paired-delta SD 1 at every stage: effects are in SD units
    result = simulate(protocol, model, Scenario.one_real(8, 1.0), replicates=2000, seed=0)
    result.p_confirm_null, result.power, result.fwer, result.cost_per_candidate   # each an Estimate(value, se)

One module per job:
  model.py     what is simulated: Protocol (and the original's and the default protocols), OutcomeModel, Scenario
  run.py       one replicate (a whole round through the real planner), many replicates (`simulate`, `compare`) and
               the Monte-Carlo estimates of the rates and the cost
  memo.py      memoisation of the pure functions a simulation calls over and over (run key digests, t quantiles)
  noise.py     the noise a finished round measured (`noise_from_round`) and the outcome model built from it
  validate.py  `fsearch validate`'s check: the spec's screens and seed check under a round's measured noise
  output.py    the command: its table or JSON, the power-against-cost PNG (`python -m orchestrator.simulate`)
"""
from __future__ import annotations

from orchestrator.simulate.memo import memoized_pure_functions
from orchestrator.simulate.model import (DECISION_STAGE, DEFAULT_MAX_FINALISTS, DEFAULT_QUICK_RUNGS, SEEDCHECK_LABELS,
                                         OutcomeModel, Protocol, Scenario, default_protocol, original_protocol,
                                         protocol_spec, search_spec)
from orchestrator.simulate.noise import MeasuredNoise, model_from_noise, noise_from_round
from orchestrator.simulate.output import format_results, main, plot_power_cost, run_command
from orchestrator.simulate.run import (Estimate, ReplicateOutcome, ScenarioResult, compare, mean_estimate, med_unit,
                                       ratio_estimate, run_replicate, seedcheck_decisions, simulate)
from orchestrator.simulate.validate import (MAX_FAMILYWISE, MIN_POWER, NOISY_SCREEN_PASS, POWER_EFFECT_SD,
                                            VALIDATE_REPLICATES, VALIDATE_SEED, WARN_SE, NoiseCheck, TaskNoiseCheck,
                                            check_noise, match_noise, uses_noisy_screens, validate_noise)

__all__ = [
    "DECISION_STAGE", "DEFAULT_MAX_FINALISTS", "DEFAULT_QUICK_RUNGS", "SEEDCHECK_LABELS", "OutcomeModel", "Protocol",
    "Scenario", "default_protocol", "original_protocol", "protocol_spec", "search_spec",
    "memoized_pure_functions",
    "Estimate", "ReplicateOutcome", "ScenarioResult", "compare", "mean_estimate", "med_unit", "ratio_estimate",
    "run_replicate", "seedcheck_decisions", "simulate",
    "MeasuredNoise", "model_from_noise", "noise_from_round",
    "MAX_FAMILYWISE", "MIN_POWER", "NOISY_SCREEN_PASS", "POWER_EFFECT_SD", "VALIDATE_REPLICATES", "VALIDATE_SEED",
    "WARN_SE", "NoiseCheck", "TaskNoiseCheck", "check_noise", "match_noise", "uses_noisy_screens", "validate_noise",
    "format_results", "main", "plot_power_cost", "run_command",
]
