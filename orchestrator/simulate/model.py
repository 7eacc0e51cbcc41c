"""What is simulated: a round's protocol (the spec the planner runs and the seed-check rule), the protocols the
simulator compares (the original's and the default), the outcome model that draws synthetic values, and the scenario
of true effects.

Outcome model, per task: baseline value on seed s = level + b_s (b_s ~ N(0, baseline_seed_sd²), shared by the
baseline and every candidate of that seed: the pairing); candidate value = baseline value + effect at that stage +
N(0, sd_stage²). The effect at a stage is effect_scale[stage] · effect + N(0, effect_sd[stage]²), one draw per
candidate and stage (a stage that sees a shrunken or only partly related effect); the final effect is the one the
seed check sees. Scenario effects are in units of the task's seed-check paired-delta SD.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from orchestrator.decisions import SeedCheckRule
from orchestrator.spec import Spec, parse_spec

DECISION_STAGE = "seedcheck"
SEEDCHECK_LABELS = ("confirmed", "inconclusive", "rejected")


@dataclass(frozen=True)
class Protocol:
    """A round's protocol: the spec the planner runs (stages, seeds, thresholds, candidates) and the seed-check rule."""

    name: str
    spec: Spec
    rule: SeedCheckRule = SeedCheckRule()
    batch_sizes: Mapping[str, int] = field(default_factory=dict)  # for `batch: auto` tasks (any value will do)

    @classmethod
    def from_spec(cls, spec: Spec, name: str | None = None, rule: SeedCheckRule | None = None) -> "Protocol":
        auto = {label: 1 for label, t in spec.tasks.items() if t.batch == "auto"}
        return cls(name or spec.round, spec, rule or SeedCheckRule(), auto)

    @property
    def n_candidates(self) -> int:
        return sum(len(self.spec.candidates(label)) for label in self.spec.tasks)


def protocol_spec(n_candidates: int = 8, quick_seeds: int = 1, med_seeds: int = 1, check_seeds: int = 5,
                  max_finalists: int = 3, threshold: float = 0.0, check_steps_as_med: bool = True) -> dict:
    """The data of a one-task spec with today's stage layout; `check_steps_as_med` makes the seed check repeat the
    med stage's training on the seeds both have (the default spec does)."""
    cands = [{"name": f"c{i}", "fs": {"layer_start": 1, "alpha_init": round(-3.0 + 0.25 * i, 4)}}
             for i in range(n_candidates)]
    return {
        "round": "simulated", "model": {"preset": "tiny"},
        "stages": {
            "quick": {"steps": 180, "eval_every": 180, "seeds": list(range(quick_seeds))},
            "med": {"steps": 650, "eval_every": 650, "seeds": list(range(med_seeds))},
            "seedcheck": {"steps": 650 if check_steps_as_med else 651, "eval_every": 650,
                          "seeds": list(range(check_seeds)), "max_finalists": max_finalists,
                          "allow_few_seeds": check_seeds < 5},
        },
        "tasks": {"t": {"task": "sudoku", "params": {"base": 2}, "batch": 8, "threshold": threshold,
                        "candidates": cands}},
    }


def original_protocol(n_candidates: int = 8, threshold: float = 0.0) -> Protocol:
    """The original's protocol (ports pin it): 1-seed quick, 1-seed med (threshold rule), 5-seed fixed check
    repeating the med run on seed 0, <= 3 finalists."""
    return Protocol.from_spec(parse_spec(protocol_spec(n_candidates, threshold=threshold)), name="original")


# The default protocol, chosen with this simulator (README "Protocol and statistics"): successive halving over quick
# seeds, then the sequential check on fresh seeds for the one best FS candidate.
DEFAULT_QUICK_RUNGS = (2, 6, 12)
DEFAULT_MAX_FINALISTS = 1


def search_spec(n_candidates: int = 8, rungs: Sequence[int] = DEFAULT_QUICK_RUNGS, keep: float = 0.5,
                drop_p: float = 0.1, looks: Sequence[int] | None = None, alpha: float = 0.05,
                max_finalists: int = DEFAULT_MAX_FINALISTS, threshold: float = 0.0, med_seeds: int = 0,
                med_rungs: Sequence[int] | None = None) -> dict:
    """The data of a one-task spec with the multi-seed rules: a halving quick screen over max(rungs) seeds, an
    optional med stage (`med_seeds` > 0, halving over its seeds), and the sequential seed check (spec defaults where
    `looks` is None)."""
    cands = [{"name": f"c{i}", "fs": {"layer_start": 1, "alpha_init": round(-3.0 + 0.25 * i, 4)}}
             for i in range(n_candidates)]
    stages: dict[str, Any] = {
        "quick": {"steps": 180, "eval_every": 180, "seeds": list(range(max(rungs))),
                  "screen": {"rule": "halving", "keep": keep, "rungs": list(rungs), "drop_p": drop_p}},
    }
    if med_seeds:
        stages["med"] = {"steps": 650, "eval_every": 650, "seeds": list(range(med_seeds)),
                         "screen": {"rule": "halving", "keep": keep, "rungs": list(med_rungs or [med_seeds]),
                                    "drop_p": drop_p}}
    stages["seedcheck"] = {"steps": 650, "eval_every": 650, "max_finalists": max_finalists, "alpha": alpha,
                           "rule": "sequential"}
    if looks is not None:
        stages["seedcheck"]["looks"] = list(looks)
    return {"round": "simulated", "model": {"preset": "tiny"}, "stages": stages,
            "tasks": {"t": {"task": "sudoku", "params": {"base": 2}, "batch": 8, "threshold": threshold,
                            "candidates": cands}}}


def default_protocol(n_candidates: int = 8, threshold: float = 0.0) -> Protocol:
    """The default protocol: halving over 2 -> 6 -> 12 quick seeds (keep half: 8 -> 4 -> 2 -> 1 candidates), then
    the sequential check (looks from the spec schema) on fresh seeds for the best FS candidate, deciding on the
    held-out test metric."""
    return Protocol.from_spec(parse_spec(search_spec(n_candidates, threshold=threshold)), name="default")


@dataclass(frozen=True)
class OutcomeModel:
    noise_sd: Mapping[str, float]  # stage -> SD of the paired deltas (candidate - matched baseline, same seed)
    wall_s: Mapping[str, float]  # stage -> seconds of one run
    effect_scale: Mapping[str, float] = field(default_factory=dict)  # stage -> share of the final effect (default 1)
    effect_sd: Mapping[str, float] = field(default_factory=dict)  # stage -> SD of a stage-only effect (default 0)
    task_noise_sd: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # task -> stage -> SD (override)
    baseline_level: float = 0.5
    baseline_seed_sd: float = 0.05
    diverge_prob: float = 0.0  # per candidate run
    repeats_identical: bool = True  # the same training in two stages gives the same value
    source: str = "uniform"  # how the numbers were obtained, for the printout

    @classmethod
    def uniform(cls, spec: Spec, sd: float = 1.0, quick_wall: float = 0.4, **kw: Any) -> "OutcomeModel":
        """The same paired-delta SD at every stage; wall times in med-run units (quick = `quick_wall`, others by
        steps relative to med)."""
        stages = dict(spec.stage_list())
        ref = stages["med"].steps if "med" in stages else max(st.steps for st in stages.values())
        walls = {n: (quick_wall if n == "quick" else st.steps / ref) for n, st in stages.items()}
        return cls(noise_sd={n: sd for n in stages}, wall_s=walls, **kw)

    def sd(self, task: str, stage: str) -> float:
        per_task = self.task_noise_sd.get(task, {})
        if stage in per_task:
            return per_task[stage]
        if stage in self.noise_sd:
            return self.noise_sd[stage]
        return self.noise_sd.get(DECISION_STAGE, max(self.noise_sd.values()))

    def sigma(self, task: str) -> float:
        """The unit of a scenario's effects for `task`: its seed-check paired-delta SD."""
        return self.sd(task, DECISION_STAGE)


@dataclass(frozen=True)
class Scenario:
    """True final effects per candidate position (spec order within each task), in units of the task's seed-check
    paired-delta SD; positions past the tuple have no effect."""

    name: str
    effects: tuple[float, ...] = ()

    @classmethod
    def null(cls) -> "Scenario":
        return cls("all null")

    @classmethod
    def one_real(cls, n_candidates: int, effect: float, position: int = 0) -> "Scenario":
        eff = [0.0] * n_candidates
        eff[position] = effect
        return cls(f"one at {effect:+g} SD", tuple(eff))

    def effect(self, position: int) -> float:
        return self.effects[position] if position < len(self.effects) else 0.0

