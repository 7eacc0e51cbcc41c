"""The noise a finished round measured (paired-delta SDs per task and stage, wall time per stage) and the outcome
model built from it."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.candidates import BASELINE
from orchestrator.errors import UserError
from orchestrator.simulate.model import DECISION_STAGE, OutcomeModel
from orchestrator.spec import Spec


@dataclass(frozen=True)
class MeasuredNoise:
    task_sd: dict[str, dict[str, float]]  # task -> stage -> pooled SD of the paired deltas over seeds
    stage_sd: dict[str, float]  # stage -> median over tasks
    wall_s: dict[str, float]  # stage -> median wall time of an ok run
    notes: list[str]


def noise_from_round(round_dir: str | Path) -> MeasuredNoise:
    """Paired-delta SDs and wall times from a round's records.

    Per task and stage, for every candidate with at least two seeds: the sample SD of its paired deltas over the
    seeds; the stage's SD pools them (variances weighted by their degrees of freedom). A stage where every candidate
    ran one seed has no such estimate: it borrows the task's seed-check SD (the spread of single deltas across
    candidates would include their real differences). Wall time per stage: the median over the stage's ok runs."""
    from orchestrator.paths import RoundPaths
    from orchestrator.records import Ledger, LedgerError

    paths = RoundPaths(Path(round_dir))
    if not paths.records.is_file():
        raise UserError(f"--noise-from {round_dir}: no {paths.records.name} there (a finished round's folder)")
    try:
        recs = Ledger(paths.records).read()
    except LedgerError as e:
        raise UserError(f"--noise-from {round_dir}: {e}") from None
    deltas: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    walls: dict[str, list[float]] = defaultdict(list)
    for r in recs:
        if r.status != "ok":
            continue
        walls[r.stage].append(r.wall_s)
        if r.delta is not None and r.candidate != BASELINE.name:
            deltas[(r.task, r.stage, r.candidate)].append(r.delta)
    pooled: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])  # sum (n-1) s^2, sum (n-1)
    tasks_stages: set[tuple[str, str]] = set()
    for (task, stage, _), ds in deltas.items():
        tasks_stages.add((task, stage))
        if len(ds) >= 2:
            acc = pooled[(task, stage)]
            acc[0] += (len(ds) - 1) * statistics.variance(ds)
            acc[1] += len(ds) - 1
    task_sd: dict[str, dict[str, float]] = defaultdict(dict)
    notes = []
    for (task, stage), (ss, df) in sorted(pooled.items()):
        task_sd[task][stage] = math.sqrt(ss / df)
        notes.append(f"{task} {stage}: SD {task_sd[task][stage]:.4g} pooled over candidates ({df:g} df)")
    for task, stage in sorted(tasks_stages - set(pooled)):
        own = task_sd.get(task, {})
        if DECISION_STAGE in own:
            notes.append(f"{task} {stage}: one seed per candidate; SD borrowed from {task} {DECISION_STAGE}")
            own[stage] = own[DECISION_STAGE]
        else:
            notes.append(f"{task} {stage}: one seed per candidate and no seed check; no SD")
    task_sd = {t: v for t, v in task_sd.items() if v}
    if not task_sd:
        raise UserError(f"--noise-from {round_dir}: no stage with two or more paired seeds per candidate")
    stages = sorted({s for v in task_sd.values() for s in v})
    stage_sd = {s: statistics.median(v[s] for v in task_sd.values() if s in v) for s in stages}
    wall = {s: statistics.median(w) for s, w in walls.items() if w}
    return MeasuredNoise(dict(task_sd), stage_sd, wall, notes)


def model_from_noise(spec: Spec, noise: MeasuredNoise, **kw: Any) -> OutcomeModel:
    """An outcome model with the measured SDs (per task where the spec's task labels match the round's) and wall
    times (stages the round did not run: by steps relative to a stage it ran)."""
    stages = dict(spec.stage_list())
    sd = {s: noise.stage_sd.get(s, noise.stage_sd.get(DECISION_STAGE, max(noise.stage_sd.values())))
          for s in stages}
    known = {s: w for s, w in noise.wall_s.items() if s in stages}
    walls = {}
    for s, st in stages.items():
        if s in known:
            walls[s] = known[s]
        else:
            ref = next(iter(known), None) or next(iter(noise.wall_s))
            ref_steps = stages[ref].steps if ref in stages else st.steps
            walls[s] = noise.wall_s[ref] * st.steps / ref_steps
    task_sd = {t: v for t, v in noise.task_sd.items() if t in spec.tasks}
    return OutcomeModel(noise_sd=sd, wall_s=walls, task_noise_sd=task_sd, source="measured", **kw)
