"""The planner: a pure function from (spec, finished records) to the runs that may start and every decision so far.

    p = plan(spec, records, batch_sizes={"mbpp_focus": 4})   # batch_sizes: probe results for `batch: auto` tasks
    p.runnable        # RunUnits in execution order; a run with a record is never returned again
    p.tasks           # per task: status (running | needs_probe | done | failed), stage, reason, per-candidate state
    p.decisions       # stage-level decisions (promote / prune / recorded) with the paired deltas behind them
    p.finished        # no task has work left

No I/O, no clock, no randomness: the same inputs give the same plan, so every decision is testable with fake records.

Rules (orchestrator contract):
- Stages run in order quick -> med -> long -> seedcheck (those the spec has). Each stage runs its own baseline for
  every stage seed; a candidate run is compared only with its matched baseline (same task, stage, seed, effective
  batch, steps, eval_every, n_val, data_seed: RunKey.matched_baseline), never with another stage's.
- Within a stage: baselines first, then candidates in spec order, seeds ascending. A candidate run becomes runnable
  once the baseline of its seed has an ok record (so a failed baseline wastes no candidate compute and every record
  can carry its delta when it is written); where a failed baseline fails the task (the threshold rule, the fixed
  check, long), once every baseline of the stage has one.
- The plan never depends on the order in which runs finish: a unit is emitted only when every completion of the runs
  still missing needs it, so several workers run exactly the runs, and make exactly the decisions, of a serial round
  (the decisions read the records by run key; ties are broken in spec order).
- Screening stages decide by their `screen` rule (orchestrator.decisions). threshold (the original's): a stage is
  complete when each of its runs has a record (a candidate's seeds run one after another, and one that failed or
  diverged skips its remaining seeds: it is pruned either way); then mean over the stage's seeds of (candidate -
  matched baseline) >= the task's threshold promotes. halving: rung by rung over the stage's seeds, synchronously
  (a rung's runs all have records before anyone moves on); a failed candidate seed counts as the metric's worst
  value; a baseline seed that failed for good removes that pair (said in the reasons); FS candidates and controls
  are halved apart.
- A tie at the task's chance level (candidate and baseline both at chance) is never promoted.
- A threshold in baseline SDs is measured first, on the first stage's calibration baselines (also matched baselines).
- seedcheck, sequential: looks of fresh paired seeds from the stage's seed pool (never a screening seed), every
  finalist on the same seeds, the test metric, until each finalist is confirmed, rejected or stopped
  (decisions.SequentialCheckRule; family = finalist_slots(spec)); fixed: the listed seeds, decided by the report's
  SeedCheckRule.
- quick: baseline + all candidates. med: baseline + quick survivors. long: baseline + the med survivor with the
  highest med delta. seedcheck: baseline + finalists (the survivors of the last gate stage, best delta first, at
  most max_finalists FS candidates and, in their own quota, max_controls controls), paired per seed. A task with no
  survivors after a gate stage is done.
- A comparison round (seedcheck is the spec's only stage): no gate stage, so the finalists are all candidates in
  spec order (the spec guarantees max_finalists >= their number) and nothing is pruned.
- Under the threshold rule and the fixed check, a baseline that failed or diverged (after its retries) fails its
  task with the reason once every baseline of the stage has a record (the other tasks go on) and a failed or
  diverged candidate is pruned with the error as its reason.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

from model.candidates import BASELINE, Candidate
from orchestrator.runconfig import Fault, LearningRates, ModelSource, RunConfig
from orchestrator.runkey import RunKey, canonical_json, candidate_digest, short_hash
from orchestrator import stage_walks
from orchestrator.decisions import (SequentialCheckRule, is_chance_tie, is_gate, rank_by_delta, run_decision,
                                    split_finalists)
from orchestrator.spec import Spec, ThresholdSD
from orchestrator.stage_walks import failure_reason, record_failure, record_field
from tasks import TaskError, task_class

TaskStatus = Literal["running", "needs_probe", "done", "failed"]
CandidateStatus = Literal["active", "pruned", "survivor", "finalist", "stopped"]
StageDecisionKind = Literal["promote", "prune", "recorded"]
StageStateKind = Literal["waiting", "running", "complete", "failed", "skipped"]


# ---------------------------------------------------------------------------------------------------------------
# one run
@dataclass(frozen=True)
class RunUnit:
    """One run the scheduler may start: its key, resolved candidate and everything its RunConfig needs."""

    key: RunKey
    candidate: Candidate
    task_kind: str
    task_params: Mapping[str, Any] = field(compare=False, hash=False)
    model: ModelSource = field(compare=False)
    lr: LearningRates = field(compare=False)
    loss: str = "mean_token"
    n_test: int = 64
    eval_batch: int = 64
    kernel: str = "auto"
    precision: str = "auto"
    compile: str = "off"  # runconfig.CompileMode
    cpu_threads: int = 1
    sandbox: str = "enforced"  # how model-written code runs (Defaults.sandbox); recorded, not part of the key
    device: str = "auto"  # the spec's default; run_config(device=...) overrides
    round: str = "adhoc"
    time_limit_s: float = 3600.0
    retries: int = 2  # crash/timeout retries (defaults.baseline_retries for baselines)
    threshold: float | None = 0.0  # None: a threshold in baseline SDs not measured yet (calibration baselines)
    metric: str | None = None  # None: the task's primary metric (RunResult.primary_metric)
    stage_seeds: int = 1  # how many seeds the unit's stage has (a stage decision averages over them)
    screen_rule: str = "threshold"  # the stage's screening rule (a one-seed threshold stage decides per record)

    # the key's parts, by name
    @property
    def run_key(self) -> str:
        return self.key.run_key

    @property
    def task(self) -> str:
        return self.key.task

    @property
    def stage(self) -> str:
        return self.key.stage

    @property
    def seed(self) -> int:
        return self.key.seed

    @property
    def steps(self) -> int:
        return self.key.steps

    @property
    def eval_every(self) -> int:
        return self.key.eval_every

    @property
    def n_val(self) -> int:
        return self.key.n_val

    @property
    def data_seed(self) -> int:
        return self.key.data_seed

    @property
    def batch_size(self) -> int:
        return self.key.batch_size

    @property
    def is_baseline(self) -> bool:
        return self.candidate.is_baseline

    @property
    def baseline_key(self) -> str | None:
        """Run key of the matched baseline (None for a baseline)."""
        return None if self.is_baseline else self.key.matched_baseline().run_key

    def metric_name(self, primary_metric: str) -> str:
        return self.metric or primary_metric

    def value_from(self, final: Mapping[str, float | None], primary_metric: str) -> float | None:
        """The decision value from a RunResult's `final` metrics: final["val_" + metric], None if absent/non-finite."""
        v = final.get("val_" + self.metric_name(primary_metric))
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None

    def run_config(self, run_dir: str, attempt: int = 0, micro_batch: int | None = None, device: str | None = None,
                   fault: Fault | None = None) -> RunConfig:
        """The worker's input for one attempt of this run (device None: the spec's defaults.device)."""
        return RunConfig(
            run_key=self.run_key, round=self.round, task=self.task, task_kind=self.task_kind,
            task_params=dict(self.task_params), candidate=self.candidate.name, mode=self.candidate.mode,
            fs=self.candidate.fs, model=self.model, stage=self.stage, steps=self.steps, eval_every=self.eval_every,
            n_val=self.n_val, n_test=self.n_test, data_seed=self.data_seed, seed=self.seed,
            batch_size=self.batch_size, micro_batch=micro_batch, lr=self.lr, loss=self.loss,  # type: ignore[arg-type]
            kernel=self.kernel, device=device or self.device, precision=self.precision,
            compile=self.compile,
            cpu_threads=self.cpu_threads, sandbox=self.sandbox,  # type: ignore[arg-type]
            eval_batch=self.eval_batch, run_dir=str(run_dir), attempt=attempt, fault=fault,
        )


# ---------------------------------------------------------------------------------------------------------------
# plan
@dataclass
class CandidateState:
    name: str
    status: CandidateStatus = "active"
    reached: str = ""  # the last stage it has runs in ("" until its first stage is planned)
    reason: str = ""
    deltas: dict[str, float | None] = field(default_factory=dict)  # stage -> mean paired delta


@dataclass
class StageDecision:
    task: str
    stage: str
    candidate: str
    decision: StageDecisionKind
    deltas: dict[int, float | None]  # seed -> paired delta (None where the run failed)
    mean_delta: float | None
    threshold: float
    reason: str
    # the multi-seed rules (halving screen, sequential seed check) fill these:
    label: str | None = None  # sequential seed check: confirmed / rejected / inconclusive
    metric: str = "val"  # which metric the deltas are on: "val" (validation) or "test" (held-out test)
    val_deltas: dict[int, float | None] = field(default_factory=dict)  # seed -> validation delta (test decisions)
    removed_pairs: list[int] = field(default_factory=list)  # seeds whose baseline failed for good: pair removed
    worst_seeds: list[int] = field(default_factory=list)  # failed/diverged candidate seeds counted as worst value
    p_value: float | None = None  # sequential: one-sided paired t p-value at the deciding look
    level: float | None = None  # sequential: nominal level per look (Pocock, Bonferroni over finalist slots)
    control: bool = False


@dataclass
class StageProgress:
    """One row of the status table: a task's stage."""

    task: str
    stage: str
    state: StageStateKind
    total: int | None = None  # runs of the stage (None until the stage is reached)
    done: int = 0  # runs with a record
    failed: int = 0  # records with status failed or diverged
    promoted: int = 0
    pruned: int = 0


@dataclass
class TaskState:
    label: str
    status: TaskStatus = "running"
    stage: str | None = None  # running: the current stage; done/failed: the last stage reached
    reason: str = ""
    candidates: dict[str, CandidateState] = field(default_factory=dict)
    long_pick: str | None = None
    finalists: list[str] = field(default_factory=list)
    threshold: float | None = None  # the task's threshold (from the calibration when given in baseline SDs)
    calibration: str = ""  # how a threshold in baseline SDs was measured

    def __str__(self) -> str:
        if self.status == "running":
            return self.stage or "waiting"
        if self.status == "failed":
            return f"failed: {self.reason}"
        if self.status == "needs_probe":
            return "needs batch probe"
        return "done"


@dataclass
class Plan:
    runnable: list[RunUnit]
    tasks: dict[str, TaskState]
    decisions: list[StageDecision]
    stages: list[StageProgress]
    needs_probe: list[str]  # labels of `batch: auto` tasks without a probed batch size
    unused_records: list[str]  # run keys of records no current run matches (an earlier version of the spec)
    warnings: list[str]

    @property
    def finished(self) -> bool:
        return all(t.status in ("done", "failed") for t in self.tasks.values())

    @property
    def task_state(self) -> dict[str, str]:
        """Per task: its current stage, 'done', 'needs batch probe' or 'failed: <reason>'."""
        return {label: str(t) for label, t in self.tasks.items()}


def plan(spec: Spec, records: Iterable[Any], batch_sizes: Mapping[str, int] | None = None) -> Plan:
    """The runnable units and decisions for `spec` given the finished `records` (Record objects or dicts)."""
    index, warnings = _index(records)
    out = Plan(runnable=[], tasks={}, decisions=[], stages=[], needs_probe=[], unused_records=[], warnings=warnings)
    used: set[str] = set()
    for label in spec.tasks:
        _TaskPlanner(spec, label, index, batch_sizes or {}, out, used).run()
    out.unused_records = [k for k in index if k not in used]
    return out


def stage_table(spec: Spec, records: Iterable[Any], batch_sizes: Mapping[str, int] | None = None) \
        -> list[StageProgress]:
    """Per task and stage: state, runs total/done/failed, candidates promoted/pruned (for `fsearch status`)."""
    return plan(spec, records, batch_sizes).stages


# ---------------------------------------------------------------------------------------------------------------
# judging one finished run (the scheduler writes this into its record)
@dataclass(frozen=True)
class Judgement:
    baseline_key: str | None
    baseline_value: float | None
    delta: float | None
    threshold: float | None
    decision: Literal["baseline", "promote", "prune", "recorded", "failed", "diverged"]


def judge(unit: RunUnit, status: str, value: float | None, records: Iterable[Any]) -> Judgement:
    """The comparison fields of a new record for `unit`.

    Baselines: decision "baseline" (or "failed"/"diverged"). Candidates: delta = value - matched baseline's value;
    in a one-seed gate stage (quick/med) the decision is "promote"/"prune" by the threshold, as the stage decision
    will be; in a gate stage with several seeds the stage decision uses the mean over seeds, so a single record says
    "recorded"; long and seedcheck runs are "recorded" (decided by statistics). A failed run: "failed", a diverged
    run: "diverged". An "ok" status without a value counts as failed.
    """
    if status == "ok" and value is None:
        status = "failed"
    bad = status in ("failed", "diverged")
    if unit.is_baseline:
        return Judgement(None, None, None, unit.threshold, run_decision(True, status, unit.stage, unit.stage_seeds,
                                                                        None, unit.threshold))
    key = unit.baseline_key
    base = next((r for r in records if record_field(r, "run_key") == key), None)
    base_value = record_field(base, "value") if base is not None and record_field(base, "status") == "ok" else None
    delta = value - base_value if (value is not None and base_value is not None and not bad) else None
    # a halving stage decides by ranking the stage's candidates, never on one record
    seeds = unit.stage_seeds if unit.screen_rule == "threshold" else 0
    decision = run_decision(False, status, unit.stage, seeds, delta, unit.threshold)
    return Judgement(key, base_value, delta, unit.threshold, decision)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# internals
def _index(records: Iterable[Any]) -> tuple[dict[str, Any], list[str]]:
    index: dict[str, Any] = {}
    warnings = []
    for r in records:
        key = record_field(r, "run_key")
        if key in index:
            warnings.append(f"run {key} has more than one record; the last one is used")
        # a record is looked at many times per plan: its failure (if any) is worked out once, in a copy
        index[key] = {**r, "_failure": failure_reason(r)} if type(r) is dict else r
    return index, warnings


def finalist_slots(spec: Spec, control: bool = False) -> int:
    """The most seed-check finalists (FS candidates, or controls) the round can have, from the spec alone: per task,
    the quota (max_finalists / max_controls) or fewer where the screening stages cannot promote more (each halving
    rung keeps at most ceil(keep x its candidates)). Fixed before any data, so a Bonferroni split over it is valid."""
    sc = spec.stages.seedcheck
    if sc is None:
        return 0
    total = 0
    for label in spec.tasks:
        controls = spec.controls(label)
        alive = sum((c.name in controls) == control for c in spec.candidates(label))
        for name, st in spec.stage_list():
            screen = getattr(st, "screen", None)
            if screen is not None and screen.rule == "halving" and alive:
                for _ in screen.rung_sizes(len(st.seeds)):
                    alive = max(1, math.ceil(screen.keep * alive - 1e-9))
        total += min(alive, sc.max_controls if control else sc.max_finalists)
    return total


def _chance_level(kind: str, params: Mapping[str, Any], metric: str | None) -> float | None:
    """The task's chance level of the decision metric (None where the task does not know it)."""
    return _chance_level_of(kind, canonical_json(dict(params)), metric)


@functools.lru_cache(maxsize=256)
def _chance_level_of(kind: str, params_json: str, metric: str | None) -> float | None:
    try:
        return task_class(kind).chance_level(json.loads(params_json), metric)
    except (TaskError, KeyError, ValueError):
        return None


class _TaskPlanner:
    def __init__(self, spec: Spec, label: str, index: dict[str, Any], batch_sizes: Mapping[str, int], out: Plan,
                 used: set[str]):
        self.spec, self.label, self.index, self.out, self.used = spec, label, index, out, used
        self.task = spec.tasks[label]
        self.model = spec.task_model(label)
        self.batch = self.task.batch if self.task.batch != "auto" else batch_sizes.get(label)
        self.candidates = spec.candidates(label)
        first = spec.stage_list()[0][0]
        self.state = TaskState(label, candidates={c.name: CandidateState(c.name, reached=first)
                                                  for c in self.candidates})
        out.tasks[label] = self.state
        d = spec.defaults
        setup = {
            "task_kind": self.task.task, "task_params": self.task.params, "model": self.model.model_dump(mode="json"),
            "lr": d.lr.model_dump(mode="json"), "loss": d.loss, "n_test": d.n_test, "eval_batch": d.eval_batch,
            "kernel": d.kernel, "precision": d.precision, "cpu_threads": d.cpu_threads,
        }
        # absent when the step is eager (off, or auto on a CPU spec), so that specs written before the option keep
        # their run keys; "on" keeps the encoding it had when compile was a yes/no setting
        if d.compile == "on":
            setup["compile"] = True
        elif d.compile in ("graphs", "eager-graphs") or (d.compile == "auto" and d.device != "cpu"):
            setup["compile"] = d.compile
        self.setup = short_hash(setup)
        self.digests = {c.name: candidate_digest(c) for c in (BASELINE, *self.candidates)}
        self.threshold: float | None = None if isinstance(self.task.threshold, ThresholdSD) else self.task.threshold
        self.state.threshold = self.threshold
        self.controls = spec.controls(label)
        self.chance = _chance_level(self.task.task, self.task.params, self.task.metric)

    # units -------------------------------------------------------------------------------------------------------
    def unit(self, cand: Candidate, stage: str, seed: int) -> RunUnit:
        spec, d, st = self.spec, self.spec.defaults, self.spec.stage(stage)
        key = RunKey(task=self.label, stage=stage, candidate=cand.name, seed=seed, batch_size=int(self.batch),
                     steps=st.steps, eval_every=st.eval_every, n_val=spec.stage_n_val(stage), data_seed=d.data_seed,
                     setup=self.setup, config=self.digests[cand.name])
        return RunUnit(key=key, candidate=cand, task_kind=self.task.task, task_params=self.task.params,
                       model=self.model, lr=d.lr, loss=d.loss, n_test=d.n_test, eval_batch=d.eval_batch,
                       kernel=d.kernel, precision=d.precision, compile=d.compile, cpu_threads=d.cpu_threads,
                       sandbox=d.sandbox,
                       device=d.device, round=spec.round,
                       time_limit_s=spec.stage_time_limit_s(stage),
                       retries=d.baseline_retries if cand.is_baseline else d.retries,
                       threshold=self.threshold, metric=self.task.metric, stage_seeds=len(st.seeds),
                       screen_rule=st.screen.rule if is_gate(stage) else "threshold")

    def record(self, unit: RunUnit) -> Any:
        rec = self.index.get(unit.run_key)
        if rec is not None:
            self.used.add(unit.run_key)
        return rec

    # the walk through the stages ---------------------------------------------------------------------------------
    def run(self) -> None:
        stages = self.spec.stage_list()
        if self.batch is None:
            self.state.status = "needs_probe"
            self.out.needs_probe.append(self.label)
            self.out.stages += [StageProgress(self.label, name, "waiting") for name, _ in stages]
            return
        if self.threshold is None and not stage_walks.calibrate(self):
            self.out.stages += [StageProgress(self.label, name, "waiting" if self.state.status == "running"
                                              else "skipped") for name, _ in stages]
            return
        members = list(self.candidates)  # survivors so far, spec order
        gate_delta: dict[str, float] = {}  # candidate -> mean delta at the last gate stage
        for i, (name, st) in enumerate(stages):
            if name == "long":
                stage_members = self._by_name(members, rank_by_delta([c.name for c in members], gate_delta)[:1])
                self.state.long_pick = stage_members[0].name
            elif name == "seedcheck" and not any(is_gate(n) for n, _ in stages[:i]):
                stage_members = members  # a comparison round: every candidate, spec order, none pruned
                self.state.finalists = [c.name for c in stage_members]
            elif name == "seedcheck":
                sc = self.spec.stages.seedcheck
                stage_members = self._by_name(members, split_finalists(
                    [c.name for c in members], gate_delta, self.controls, sc.max_finalists, sc.max_controls))
                self.state.finalists = [c.name for c in stage_members]
                for c in members:
                    if c not in stage_members:
                        quota = "seedcheck.max_controls" if c.name in self.controls else "seedcheck.max_finalists"
                        self._set(c.name, "pruned", f"not among the best {self._last_gate(i)} deltas ({quota})")
            else:
                stage_members = members
            for c in stage_members:
                self.state.candidates[c.name].reached = name
            self.state.stage = name
            if is_gate(name) and st.screen.rule == "halving":
                outcome = stage_walks.walk_halving(self, name, st, stage_members)
            elif name == "seedcheck" and st.rule == "sequential":
                outcome = stage_walks.walk_sequential(self, name, st, stage_members)
            else:
                outcome = stage_walks.walk_stage(self, name, st.seeds, stage_members)
            if outcome is None:  # running, or the task failed
                self.out.stages += [StageProgress(self.label, n, "waiting" if self.state.status == "running"
                                                  else "skipped") for n, _ in stages[i + 1:]]
                return
            if is_gate(name):
                members = [c for c in stage_members if outcome[c.name][0] == "promote"]
                gate_delta = {c.name: outcome[c.name][1] for c in members}
                if not members:
                    best = max((v[1] for v in outcome.values() if v[1] is not None), default=None)
                    tail = f" (best delta {best:+.4g}, threshold {self.threshold:g})" if best is not None else ""
                    self._finish(f"no candidate passed {name}{tail}")
                    self.out.stages += [StageProgress(self.label, n, "skipped") for n, _ in stages[i + 1:]]
                    return
        for c in members:
            cs = self.state.candidates[c.name]
            if cs.status == "active":
                cs.status = "finalist" if c.name in self.state.finalists else "survivor"
        self._finish(f"finalists: {', '.join(self.state.finalists)}" if self.state.finalists
                     else f"survivors: {', '.join(c.name for c in members)}")

    # chance level ------------------------------------------------------------------------------------------------
    def chance_tie(self, cand_recs: list[Any], base_recs: list[Any]) -> bool:
        cand = [record_field(r, "value") for r in cand_recs if r is not None and record_failure(r) is None]
        base = [record_field(r, "value") for r in base_recs if r is not None and record_failure(r) is None]
        return is_chance_tie(cand, base, self.chance, self.task.metric or "")

    # the sequential seed check -----------------------------------------------------------------------------------
    def sequential_rule(self, st: Any, control: bool) -> SequentialCheckRule:
        """The rule of one finalist: the FS finalists' family is every task's FS finalist slots, the controls' their
        own slots (Bonferroni; the slots are fixed by the spec before any data: see finalist_slots)."""
        return SequentialCheckRule(tuple(st.looks), st.alpha, max(1, finalist_slots(self.spec, control)))

    # state helpers -----------------------------------------------------------------------------------------------
    def stage_row(self, name: str, total: int | None = None) -> StageProgress:
        """A new status-table row for one of this task's stages, running until its walker says otherwise."""
        row = StageProgress(self.label, name, "running", total=total)
        self.out.stages.append(row)
        return row

    def add_decision(self, stage: str, candidate: str, decision: StageDecisionKind, deltas: dict[int, float | None],
                     mean_delta: float | None, reason: str, **details: Any) -> None:
        """Record one stage decision of this task (at the task's threshold; `details`: the multi-seed fields)."""
        self.out.decisions.append(StageDecision(self.label, stage, candidate, decision, deltas, mean_delta,
                                                self.threshold, reason, control=candidate in self.controls, **details))

    def _set(self, name: str, status: CandidateStatus, reason: str) -> None:
        cs = self.state.candidates[name]
        cs.status, cs.reason = status, reason

    def _fail(self, reason: str) -> None:
        self.state.status, self.state.reason = "failed", reason
        for cs in self.state.candidates.values():
            if cs.status == "active":
                cs.status, cs.reason = "stopped", "task failed"

    def _finish(self, reason: str) -> None:
        self.state.status, self.state.reason = "done", reason

    @staticmethod
    def _by_name(members: list[Candidate], names: list[str]) -> list[Candidate]:
        by_name = {c.name: c for c in members}
        return [by_name[n] for n in names]

    def _last_gate(self, i: int) -> str:
        return next(n for n, _ in reversed(self.spec.stage_list()[:i]) if is_gate(n))

