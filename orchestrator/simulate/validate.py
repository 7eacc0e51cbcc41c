"""`fsearch validate`: is a spec's protocol more than noise, under the noise a round measured?"""
from __future__ import annotations

import dataclasses
import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from orchestrator.errors import UserError
from orchestrator.simulate.memo import memoized_pure_functions
from orchestrator.simulate.model import DECISION_STAGE, Protocol, Scenario
from orchestrator.simulate.noise import MeasuredNoise, model_from_noise, noise_from_round
from orchestrator.simulate.run import (Estimate, ReplicateOutcome, mean_estimate, med_unit, ratio_estimate,
                                      run_replicate)
from orchestrator.spec import Spec

VALIDATE_REPLICATES = 200  # per scenario: a Monte-Carlo SE about 3.5 points on a rate near 50%, seconds in all
VALIDATE_SEED = 0
NOISY_SCREEN_PASS = 0.25  # a screen passing a null candidate more often than this is mostly noise
MAX_FAMILYWISE = 0.05
MIN_POWER = 0.5
POWER_EFFECT_SD = 1.0  # the real candidate's effect, in SDs of its task's seed-check paired delta
WARN_SE = 2.0  # a rate is past a limit when it is past it by this many Monte-Carlo SEs (a protocol built to hold
# exactly 5% must not warn on simulation noise)


def _above(e: Estimate, limit: float) -> bool:
    return e.value is not None and e.value - WARN_SE * (e.se or 0.0) > limit


def _below(e: Estimate, limit: float) -> bool:
    return e.value is not None and e.value + WARN_SE * (e.se or 0.0) < limit


@dataclass
class TaskNoiseCheck:
    task: str
    matched: str  # which of the noise round's tasks gave the SDs, and how it was matched
    sd: dict[str, float]  # stage -> paired-delta SD simulated
    screen_pass_null: dict[str, Estimate]  # gate stage -> P(a null FS candidate that reaches it passes)
    screen_rule: dict[str, str]  # gate stage -> its rule and seed count, for the advice
    fwer: Estimate  # P(any of the task's candidates confirmed | every candidate null)
    power: Estimate  # P(the first FS candidate confirmed | it has a +POWER_EFFECT_SD effect)
    cost_per_candidate_s: float  # wall seconds per candidate, baselines included (every candidate null)
    med_run_s: float

    def line(self) -> str:
        sds = ", ".join(f"{s} {v:.3g}" for s, v in self.sd.items())
        screens = ", ".join(f"{s} {_pct(e)}" for s, e in self.screen_pass_null.items()) or "no screen"
        return (f"{self.task} ({self.matched}; paired-delta SD {sds}): a null candidate passes {screens}; "
                f"family-wise P(any confirmation | all null) {_pct(self.fwer)}; power at +{POWER_EFFECT_SD:g} SD "
                f"{_pct(self.power)}; cost {self.cost_per_candidate_s / self.med_run_s:.2f} med runs "
                f"({self.cost_per_candidate_s:.0f} s) per candidate")

    def warnings(self) -> list[str]:
        out = []
        for stage, e in self.screen_pass_null.items():
            if _above(e, NOISY_SCREEN_PASS):
                rule = self.screen_rule[stage]
                advice = ("a halving screen over so few candidates keeps many by rank: more candidates, a smaller "
                          "keep or more rungs" if rule.startswith("halving")
                          else "run more seeds (screen: halving)")
                out.append(f"{self.task} {stage} screen ({rule}): a candidate with no effect passes "
                           f"{100 * e.value:.0f}% of the time: it is mostly noise; {advice}")
        if _above(self.fwer, MAX_FAMILYWISE):
            out.append(f"{self.task}: the seed check confirms a candidate with no effect in {100 * self.fwer.value:.1f}%"
                       f" of rounds (> {100 * MAX_FAMILYWISE:g}%): use the sequential check on fresh seeds "
                       f"(seedcheck.rule: sequential) or more seeds")
        if _below(self.power, MIN_POWER):
            sd = self.sd.get(DECISION_STAGE)
            unit = f" ({sd:.3g})" if sd is not None else ""
            out.append(f"{self.task}: a real effect of +{POWER_EFFECT_SD:g} SD{unit} is confirmed in only "
                       f"{100 * self.power.value:.0f}% of rounds (< {100 * MIN_POWER:g}%): more seeds in the screens "
                       f"and the seed check (seedcheck.looks)")
        return out


@dataclass
class NoiseCheck:
    source: str
    replicates: int
    seed: int
    tasks: list[TaskNoiseCheck]
    unmatched: list[str]  # spec tasks with no known noise: nothing simulated is said of them
    round_fwer: Estimate | None  # over every task, where every task's noise is known
    seconds: float

    def lines(self) -> list[str]:
        if not self.tasks:
            return [f"error rates: {self.source} measured no noise for this spec's tasks "
                    f"({', '.join(self.unmatched)}); not simulated"]
        out = [f"error rates under the noise measured in {self.source} ({self.replicates} simulated rounds per "
               f"scenario, seed {self.seed}, {self.seconds:.1f} s):"]
        out += ["  " + t.line() for t in self.tasks]
        out += [f"  {label}: no noise measured for this task there; not simulated" for label in self.unmatched]
        if self.round_fwer is not None and len(self.tasks) > 1:
            out.append(f"  round: family-wise P(any confirmation | all null) {_pct(self.round_fwer)}")
        return out

    def warnings(self) -> list[str]:
        out = [w for t in self.tasks for w in t.warnings()]
        if self.round_fwer is not None and len(self.tasks) > 1 and _above(self.round_fwer, MAX_FAMILYWISE):
            out.append(f"the round confirms a candidate with no effect in {100 * self.round_fwer.value:.1f}% of "
                       f"rounds (> {100 * MAX_FAMILYWISE:g}%)")
        return out


def _pct(e: Estimate) -> str:
    return "-" if e.value is None else f"{100 * e.value:.0f}%"


def _round_tasks(round_dir: Path) -> dict[str, tuple[str, Any]]:
    """The noise round's tasks: label -> (kind, params), read from its spec.yaml as plain YAML (a round written under
    an older schema still names its tasks)."""
    import yaml

    from orchestrator.paths import RoundPaths

    path = RoundPaths(round_dir).spec
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict):
        return {}
    return {str(label): (t.get("task"), t.get("params") or {}) for label, t in tasks.items() if isinstance(t, dict)}


def match_noise(spec: Spec, noise: MeasuredNoise, round_tasks: Mapping[str, tuple[str, Any]]) \
        -> dict[str, tuple[str, str]]:
    """spec task -> (noise round task, how matched): the same label, else the same task kind and parameters."""
    out = {}
    for label, t in spec.tasks.items():
        if label in noise.task_sd:
            out[label] = (label, "noise of the same task label")
            continue
        same = [n for n, (kind, params) in round_tasks.items()
                if n in noise.task_sd and kind == t.task and params == t.params]
        if same:
            out[label] = (same[0], f"noise of the round's {same[0]}: same task and parameters")
    return out


def uses_noisy_screens(spec: Spec) -> bool:
    """Absolute thresholds and a one-seed threshold screen: the original's layout, whose screens are coin flips when
    the threshold is far below the seed noise."""
    from orchestrator.decisions import is_gate

    absolute = any(isinstance(t.threshold, float) for t in spec.tasks.values())
    one_seed = any(is_gate(name) and st.screen.rule == "threshold" and len(st.seeds) == 1
                   for name, st in spec.stage_list())
    return absolute and one_seed


def check_noise(spec: Spec, noise_round: str | Path, replicates: int = VALIDATE_REPLICATES,
                seed: int = VALIDATE_SEED) -> NoiseCheck:
    """The spec's protocol, simulated (real planner and decision rules) under the paired-delta SDs and wall times
    measured in `noise_round`, for the spec's tasks whose noise is known there: per task, how often a null candidate
    passes each screen, P(any confirmation) with every candidate null, power at +1 SD, and cost per candidate. The
    spec's tasks without known noise are simulated at the round's median SD (they share the seed check's error
    family with the others) but nothing is said of them."""
    import time

    from orchestrator.decisions import is_gate

    noise = noise_from_round(noise_round)
    matches = match_noise(spec, noise, _round_tasks(Path(noise_round)))
    if not matches:
        return NoiseCheck(str(noise_round), replicates, seed, [], list(spec.tasks), None, 0.0)
    protocol = Protocol.from_spec(spec)
    stages = [name for name, _ in spec.stage_list()]
    task_sd: dict[str, dict[str, float]] = {}
    for label, (source, _) in matches.items():
        own = noise.task_sd[source]
        # a stage the noise round did not measure borrows the task's seed-check SD, as noise_from_round does
        fallback = own.get(DECISION_STAGE, statistics.median(own.values()))
        task_sd[label] = {s: own.get(s, fallback) for s in stages}
    model = dataclasses.replace(model_from_noise(spec, noise), task_noise_sd=task_sd)
    unit_s = med_unit(protocol, model)
    known = list(matches)
    t0 = time.perf_counter()

    def rounds(scenario: Scenario) -> list[ReplicateOutcome]:
        rng = random.Random(f"{seed}/validate/{scenario.name}")
        return [run_replicate(protocol, model, scenario, rng) for _ in range(replicates)]

    fs_position = {label: next((i for i, c in enumerate(spec.candidates(label)) if not spec.is_control(label, c.name)),
                               None) for label in known}
    n_max = max(len(spec.candidates(label)) for label in spec.tasks)
    with memoized_pure_functions():
        null = rounds(Scenario.null())
        real = {pos: rounds(Scenario.one_real(n_max, POWER_EFFECT_SD, pos))
                for pos in sorted({p for p in fs_position.values() if p is not None})}
    checks = []
    for label in known:
        gates = [(name, st) for name, st in spec.stage_list() if is_gate(name)]
        passed: dict[str, list[float]] = {name: [] for name, _ in gates}
        entered: dict[str, list[float]] = {name: [] for name, _ in gates}
        for out in null:
            for name, _ in gates:
                ds = [d for d in out.stage_decisions if d.task == label and d.stage == name and not d.control]
                entered[name].append(len(ds))
                passed[name].append(sum(d.decision == "promote" for d in ds))
        fwer = mean_estimate([float(any(lab == "confirmed" for (t, _), lab in out.seedcheck.items() if t == label))
                      for out in null])
        pos = fs_position[label]
        if pos is None:
            power = Estimate(None, None)
        else:
            name = spec.candidates(label)[pos].name
            power = mean_estimate([float(out.seedcheck.get((label, name)) == "confirmed") for out in real[pos]])
        n_cand = len(spec.candidates(label))
        checks.append(TaskNoiseCheck(
            task=label, matched=matches[label][1], sd=task_sd[label],
            screen_pass_null={name: ratio_estimate(passed[name], entered[name]) for name, _ in gates},
            screen_rule={name: f"{st.screen.rule}, {len(st.seeds)} seed{'s' if len(st.seeds) > 1 else ''}"
                         for name, st in gates},
            fwer=fwer, power=power,
            cost_per_candidate_s=math.fsum(out.task_wall_s.get(label, 0.0) for out in null) / len(null) / n_cand,
            med_run_s=unit_s))
    unmatched = [label for label in spec.tasks if label not in matches]
    round_fwer = None if unmatched else mean_estimate([float("confirmed" in out.seedcheck.values()) for out in null])
    return NoiseCheck(str(noise_round), replicates, seed, checks, unmatched, round_fwer, time.perf_counter() - t0)


def validate_noise(spec: Spec, noise_from: str | None) -> tuple[list[str], list[str]]:
    """`fsearch validate`'s error-rate check: (lines, warnings). The noise comes from `noise_from`; without it, from
    the spec's own round folder where the spec has the original's noisy screens and that round has records (a
    resumed round); else there is no known noise and nothing is said."""
    from orchestrator.paths import RoundPaths

    if noise_from is None:
        own = spec.round_dir
        if not (uses_noisy_screens(spec) and RoundPaths(own).records.is_file()):
            return [], []
        try:
            check = check_noise(spec, own)
        except UserError as e:
            return [f"error rates: the round's own records measure no noise yet ({e})"], []
    else:
        check = check_noise(spec, noise_from)
    return check.lines(), check.warnings()
