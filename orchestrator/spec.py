"""The round spec: a YAML file, its schema (every default of a round lives here), its structural rules and loading.

    spec = load_spec(find_spec_file("round22"))      # schema + structure: SpecError on the first problem
    warnings = validate_spec(spec)                    # + model layer count, task kinds/params, data: SpecError

The checks beyond the schema (validate_spec, check_spec: the model, the task registry, the data, the sandbox) live in
orchestrator.spec_checks; SpecError and the one-line wording of pydantic's errors in orchestrator.spec_errors. Both
are re-exported here, so `from orchestrator.spec import validate_spec, SpecError` is the one import a caller needs.

Every user error is a SpecError whose message is ONE line naming the field, e.g.
`tasks.sudoku4.candidates[1]: unknown candidate 'foo': ...` or `stages.med.steps: must be greater than quick.steps
(120), got 100`. Rules (orchestrator contract, "Validation"):
- unknown keys anywhere (except top-level `x-...` keys, ignored: a place for YAML anchors); YAML syntax errors and
  duplicate mapping keys (with the line number);
- stages: quick < med < long in steps, eval_every <= steps, seeds non-empty, unique, in [0, 2**32), med needs quick,
  long needs med, seedcheck with fewer than 5 seeds unless `allow_few_seeds: true`; at least quick or seedcheck;
- a comparison round has `seedcheck` as its only stage: every candidate of every task runs the seed check against
  the matched baselines, nothing is pruned, so seedcheck.max_finalists must be >= each task's number of candidates;
- tasks: labels and candidate names match [A-Za-z0-9_-]+; `baseline` is never listed (it is implicit); candidate
  names unique within a task and no two candidates of a task resolve to the same configuration; threshold >= 0;
- model: exactly one of preset and checkpoint; `shape` (ModelShape: n_layer, n_embd, head_size, ffn_dim, LoRA
  ranks) only with a preset; unknown shape fields are errors. A task may give its own `model` (same rules), which
  replaces the round's for that task (its runs, baselines included, and its candidates' layer checks);
- validate_spec adds the checks against the model, the task registry and the data (orchestrator.spec_checks).

Candidates resolve with model.candidates.resolve: spec `defaults.fs` < library name < explicit `fs`.
Relative checkpoint paths are relative to the current working directory (the scheduler and its workers share it).
Torch-free.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, field_validator, \
    model_serializer, model_validator

from model.candidates import BASELINE, Candidate, resolve
from model.fs_config import FSConfig
from orchestrator import paths
from orchestrator.runconfig import CompileMode, LearningRates, ModelSource, compile_mode
from orchestrator.runkey import NAME_PATTERN, canonical_json
# SpecError and did_you_mean are imported from here by the CLI and the tests too
from orchestrator.spec_errors import SpecError, StructureError, candidate_suggestion, did_you_mean, \
    pydantic_message, spec_error

STAGE_ORDER = ("quick", "med", "long", "seedcheck")
GATE_STAGES = ("quick", "med")  # stages whose delta decides promotion
COMPARISON_STAGES = ("seedcheck",)  # the stages of a comparison round (no screening, nothing pruned)
MAX_SEED = 2**32 - 1  # numpy's and most RNGs' limit
DEFAULT_LOOKS = (4, 6, 8, 10, 12, 16, 20)  # the sequential seed check's looks (paired seeds; see `fsearch simulate`)
SEQUENTIAL_SEED_OFFSET = 1000  # the sequential seed check's default seed pool starts here (fresh seeds)
SPARE_SEEDS = 2  # pool seeds past the last look, used when a baseline seed fails for good
MIN_SEEDCHECK_SEEDS = 5  # 2**-5 = 0.031: the fewest paired seeds for which an exact sign test can reach p < 0.05
SPEC_SUFFIXES = (".yaml", ".yml")
STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"
LOWER_IS_BETTER = ("loss",)  # metrics a promotion threshold cannot apply to (delta = candidate - baseline > 0 wins)
EXTENSION_PREFIX = "x-"  # top-level keys starting with this are ignored: a place for YAML anchors (x-candidates: &c)
_NAME_RX = re.compile(f"^{NAME_PATTERN}$")
_ROUND_RX = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")  # a folder name under `output`: no leading dot


# ---------------------------------------------------------------------------------------------------------------
# schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ProbeDefaults(_Strict):
    """The GPU batch probe behind `batch: auto` (run once per task by the scheduler)."""

    micro_batches: list[int] = Field(default_factory=lambda: [64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1], min_length=1)
    margin: float = Field(0.9, gt=0.0, le=1.0)  # use at most this share of the device's memory
    cpu_batch: int | None = Field(None, ge=1)  # what `auto` means without CUDA; null: `auto` on CPU is an error

    @field_validator("micro_batches")
    @classmethod
    def _descending(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v) or v != sorted(set(v), reverse=True):
            raise ValueError("must be distinct positive sizes in descending order")
        return v


class Defaults(_Strict):
    fs: dict[str, Any] = Field(default_factory=dict)  # FSConfig fields: fill only what a library name leaves open
    lr: LearningRates = Field(default_factory=LearningRates)
    loss: Literal["mean_token", "first_plus_rest"] = "mean_token"
    n_val: int = Field(64, ge=1)  # validation examples per eval (a fixed set)
    n_test: int = Field(64, ge=1)
    eval_batch: int = Field(64, ge=1)
    data_seed: int = Field(0, ge=0, le=MAX_SEED)
    kernel: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # how the training step runs (runconfig.CompileMode): "auto" (graph replays of compiled, length-bucketed steps on
    # a GPU, eager on CPU), "off", "on" (compiled blocks), "graphs" or "eager-graphs" (graph replays, no compile). It
    # changes numerics slightly, so it is part of a run's identity and a baseline and its candidates always share it.
    # (YAML's on/off read as "on"/"off".)
    compile: CompileMode = "auto"
    cpu_threads: int = Field(1, ge=1)  # torch threads of a CPU run; part of the run's identity (results depend on it)
    # model-written code (MBPP) runs behind a namespace boundary (tasks/sandbox.py); "unsafe" is the explicit,
    # recorded opt-out for machines that cannot provide it
    sandbox: Literal["enforced", "unsafe"] = "enforced"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    time_limit_s: float = Field(3600.0, gt=0.0)  # per run
    # "warm": one process runs the round's runs one after another (imports, compiled graphs and autotuning paid once;
    # replaced after a run that fails or leaves GPU memory behind); "fresh": a process per run. The same numbers.
    worker: Literal["fresh", "warm"] = "warm"
    retries: int = Field(2, ge=0)  # crash/timeout retries per candidate run
    baseline_retries: int = Field(2, ge=0)
    probe: ProbeDefaults = Field(default_factory=ProbeDefaults)

    @field_validator("compile", mode="before")
    @classmethod
    def _compile(cls, v: Any) -> Any:
        return compile_mode(v)


class Stage(_Strict):
    steps: int = Field(ge=1)  # optimizer steps
    eval_every: int = Field(ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    n_val: int | None = Field(None, ge=1)  # default: defaults.n_val
    time_limit_s: float | None = Field(None, gt=0.0)  # default: defaults.time_limit_s

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        for s in v:
            if not 0 <= s <= MAX_SEED:
                raise ValueError(f"seeds must be between 0 and {MAX_SEED}, got {s}")
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise ValueError(f"duplicate seed {dup[0]}")
        return v


class ScreenSpec(_Strict):
    """How a screening stage (quick, med) decides: `halving` (successive halving over the stage's seeds, the
    default) or `threshold` (the original system's rule: promote when the mean paired delta reaches the threshold).
    See orchestrator.decisions."""

    rule: Literal["halving", "threshold"] = "halving"
    keep: float = Field(0.5, gt=0.0, le=1.0)  # halving: share of a rung's candidates kept for the next rung
    rungs: list[int] | None = None  # halving: cumulative seeds per rung; default 1, 3, 7, ... capped at the seeds
    drop_p: float = Field(0.1, gt=0.0, lt=0.5)  # halving: drop when the one-sided t upper bound < threshold

    def rung_sizes(self, n_seeds: int) -> list[int]:
        """The cumulative seed counts of the stage's rungs (the threshold rule: one rung of every seed)."""
        if self.rule == "threshold":
            return [n_seeds]
        if self.rungs:
            return sorted(set(self.rungs))
        sizes = [1]
        while sizes[-1] < n_seeds:
            sizes.append(min(n_seeds, 2 * sizes[-1] + 1))
        return sizes


class GateStage(Stage):
    screen: ScreenSpec = Field(default_factory=ScreenSpec)

    @model_validator(mode="before")
    @classmethod
    def _screen_default(cls, data: Any) -> Any:
        """Without `screen`: halving over a stage's seeds; a one-seed stage (every spec written for the original
        screen) keeps the threshold rule, there being nothing to halve over."""
        if isinstance(data, dict) and "screen" not in data:
            seeds = data.get("seeds", [0])
            many = isinstance(seeds, list) and len(seeds) > 1
            return {**data, "screen": {"rule": "halving" if many else "threshold"}}
        return data


class LongStage(Stage):
    pick: Literal["best_med"] = "best_med"  # the med survivor with the highest med delta


class SeedcheckStage(Stage):
    # fixed: the listed seeds (default 0-4), the original's check; sequential: a pool the looks draw from in order
    # (default: SEQUENTIAL_SEED_OFFSET onwards, past every screening seed)
    seeds: list[int] = Field(default_factory=lambda: list(range(MIN_SEEDCHECK_SEEDS)), min_length=1)
    max_finalists: int = Field(3, ge=1)  # FS finalists per task
    allow_few_seeds: bool = False  # accept < 5 seeds (a demonstration; no sign test can reach p < 0.05)
    # sequential (default in a screening round) or fixed (default in a comparison round, and the original's rule)
    rule: Literal["sequential", "fixed"] | None = None
    looks: list[int] = Field(default_factory=lambda: list(DEFAULT_LOOKS), min_length=1)  # cumulative paired seeds
    alpha: float = Field(0.05, gt=0.0, lt=0.5)  # sequential: one-sided family-wise error over looks and finalists
    max_controls: int = Field(1, ge=0)  # control finalists per task (their own quota)
    decide_on: Literal["test", "val"] | None = None  # default: test (sequential), val (fixed)

    @field_validator("looks")
    @classmethod
    def _looks(cls, v: list[int]) -> list[int]:
        if v != sorted(set(v)) or v[0] < 2:
            raise ValueError(f"looks must be ascending paired-seed counts >= 2, got {v}")
        return v


class Stages(_Strict):
    quick: GateStage | None = None  # the screen; without it (and without med/long) the round is a comparison round
    med: GateStage | None = None
    long: LongStage | None = None
    seedcheck: SeedcheckStage | None = None

    @model_validator(mode="before")
    @classmethod
    def _seedcheck_defaults(cls, data: Any) -> Any:
        """The seed check's defaults that depend on the spec: the rule (fixed when the spec lists the seeds, as
        every spec written for the original's check does, and in a comparison round, where no seed selects
        anything; sequential otherwise), the metric it decides on, the sequential rule's fresh seed pool."""
        if not isinstance(data, dict) or not isinstance(data.get("seedcheck"), dict):
            return data
        sc = dict(data["seedcheck"])
        comparison = not any(data.get(n) is not None for n in STAGE_ORDER if n != "seedcheck")
        sc.setdefault("rule", "fixed" if comparison or "seeds" in sc else "sequential")
        sc.setdefault("decide_on", "test" if sc["rule"] == "sequential" else "val")
        if sc["rule"] == "sequential" and "seeds" not in sc:
            looks = sc.get("looks", DEFAULT_LOOKS)
            last = looks[-1] if isinstance(looks, (list, tuple)) and looks and isinstance(looks[-1], int) else 0
            sc["seeds"] = list(range(SEQUENTIAL_SEED_OFFSET, SEQUENTIAL_SEED_OFFSET + last + SPARE_SEEDS))
        return {**data, "seedcheck": sc}


class CandidateSpec(_Strict):
    """A library name with overrides ({name, preset, fs}) or an explicit configuration ({name, fs})."""

    name: str
    preset: str | None = None  # library name this candidate starts from
    fs: dict[str, Any] | None = None  # explicit FS fields (override the preset's and the defaults')
    control: bool | None = None  # a control (own finalist quota); default: true for read_twice, else false


class ThresholdSD(_Strict):
    """A threshold in units of the baseline's seed-to-seed SD, measured on the quick stage's first
    `calibration_seeds` baseline runs (which are also the matched baselines of those seeds)."""

    sd: float = Field(ge=0.0)
    calibration_seeds: int = Field(3, ge=2)


class TaskSpec(_Strict):
    task: str  # registry name (tasks.task_names())
    params: dict[str, Any] = Field(default_factory=dict)
    batch: int | Literal["auto"]  # effective batch, or the GPU probe's largest micro-batch
    # the smallest effect worth having (delta = candidate - matched baseline): absolute, or {sd: x} baseline SDs
    threshold: float | ThresholdSD

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, v: Any) -> Any:
        """A number is checked here (one message, not one per form of the union)."""
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(v):
                raise ValueError(f"Input should be a finite number (got {v})")
            if v < 0:
                raise ValueError("Input should be greater than or equal to 0")
            return float(v)
        return v
    metric: str | None = None  # default: the task's primary metric
    model: ModelSource | None = None  # default: the round's `model` (a task may train another shape or checkpoint)
    candidates: list[CandidateSpec] = Field(min_length=1)

    @field_validator("batch", mode="before")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        if v == "auto" and isinstance(v, str):
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"must be a positive integer or 'auto', got {v!r}")
        return v

    @field_validator("candidates", mode="before")
    @classmethod
    def _names_to_items(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": c} if isinstance(c, str) else c for c in v]
        return v

    @model_serializer(mode="wrap")
    def _without_absent_model(self, handler: Any) -> dict[str, Any]:
        data = handler(self)  # no `model: null` in a dump: a task without its own model dumps as it always did
        if self.model is None:
            data.pop("model", None)
        return data


class Spec(_Strict):
    round: str
    model: ModelSource
    output: str = "results"  # root folder; the round folder is <output>/<round>
    storage: str | None = None  # default: sqlite:///<round folder>/study.db
    defaults: Defaults = Field(default_factory=Defaults)
    stages: Stages
    tasks: dict[str, TaskSpec] = Field(min_length=1)

    _candidates: dict[str, tuple[Candidate, ...]] = PrivateAttr(default_factory=dict)
    _controls: dict[str, frozenset[str]] = PrivateAttr(default_factory=dict)
    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _structure(self) -> "Spec":
        errors = _structure_errors(self)
        if errors:
            raise StructureError(errors)
        self._candidates = {label: tuple(_resolve_task_candidates(self, label)) for label in self.tasks}
        self._controls = {label: frozenset(c.name for item, c in zip(t.candidates, self._candidates[label])
                                           if (item.control if item.control is not None else c.mode == "read_twice"))
                          for label, t in self.tasks.items()}
        return self

    # derived views ---------------------------------------------------------------------------------------------
    @property
    def source(self) -> Path | None:
        """The file this spec was loaded from (None when built from data)."""
        return self._source

    def task_model(self, label: str) -> ModelSource:
        """The model a task trains: its own `model`, else the round's."""
        return self.tasks[label].model or self.model

    def candidates(self, label: str) -> tuple[Candidate, ...]:
        """The task's candidates, resolved, in spec order (the implicit baseline not included)."""
        return self._candidates[label]

    @property
    def is_comparison(self) -> bool:
        """A comparison round: seedcheck is the only stage, every candidate runs it, nothing is pruned."""
        return is_comparison(self.stages)

    def stage_list(self) -> list[tuple[str, Stage]]:
        """The spec's stages in execution order."""
        return [(name, getattr(self.stages, name)) for name in STAGE_ORDER if getattr(self.stages, name) is not None]

    def is_control(self, label: str, name: str) -> bool:
        """A control candidate of task `label` (spec `control`, default: the read_twice mode)."""
        return name in self._controls.get(label, frozenset())

    def controls(self, label: str) -> frozenset[str]:
        return self._controls.get(label, frozenset())

    def stage(self, name: str) -> Stage:
        st = getattr(self.stages, name, None)
        if st is None:
            raise KeyError(f"the spec has no stage {name!r}")
        return st

    def stage_n_val(self, name: str) -> int:
        st = self.stage(name)
        return st.n_val if st.n_val is not None else self.defaults.n_val

    def stage_time_limit_s(self, name: str) -> float:
        st = self.stage(name)
        return st.time_limit_s if st.time_limit_s is not None else self.defaults.time_limit_s

    @property
    def round_dir(self) -> Path:
        return Path(self.output) / self.round

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.round_dir / paths.STUDY_DB).as_posix()}"


# ---------------------------------------------------------------------------------------------------------------
# structural rules (no model, no task registry, no data)
def _structure_errors(spec: Spec) -> list[str]:
    errors: list[str] = []
    if not _ROUND_RX.match(spec.round):
        errors.append(f"round: must be letters, digits, '_', '-' or '.' (not first), got {spec.round!r}")
    if spec.storage is not None and not re.match(r"^(sqlite:///|postgresql(\+\w+)?://)", spec.storage):
        errors.append(f"storage: must be a sqlite:/// or postgresql:// URL, got {spec.storage!r}")
    for name, value in spec.defaults.lr:
        if any(not math.isfinite(x) for x in (value if isinstance(value, tuple) else (value,))):
            errors.append(f"defaults.lr.{name}: must be finite, got {value}")
    fs_errors = _fs_defaults_errors(spec.defaults.fs)
    errors += fs_errors + _stage_errors(spec.stages)
    if fs_errors:
        return errors  # every candidate would repeat the defaults' problem
    for label, task in spec.tasks.items():
        errors += _task_errors(spec, label, task)
    return errors


def _fs_defaults_errors(fs: dict[str, Any]) -> list[str]:
    errors = []
    for key, value in fs.items():
        if key not in FSConfig.model_fields:
            errors.append(f"defaults.fs.{key}: unknown FS option; known: {', '.join(FSConfig.model_fields)}")
            continue
        try:
            TypeAdapter(FSConfig.model_fields[key].annotation).validate_python(value)
        except ValidationError as e:
            errors.append(f"defaults.fs.{key}: {pydantic_message(e.errors()[0])}")
    return errors


def is_comparison(stages: Stages) -> bool:
    present = tuple(n for n in STAGE_ORDER if getattr(stages, n) is not None)
    return present == COMPARISON_STAGES


def _stage_errors(stages: Stages) -> list[str]:
    errors = []
    present = [(n, getattr(stages, n)) for n in STAGE_ORDER if getattr(stages, n) is not None]
    if stages.quick is None and stages.seedcheck is None:
        errors.append("stages: give `quick` (a screening round: quick -> med -> long -> seedcheck, pruning below "
                      "the threshold) or `seedcheck` alone (a comparison round: every candidate, no pruning)")
    if stages.med is not None and stages.quick is None:
        errors.append("stages.med: needs stages.quick (med confirms the quick survivors); for a comparison round "
                      "without pruning give seedcheck alone")
    for name, st in present:
        if st.eval_every > st.steps:
            errors.append(f"stages.{name}.eval_every: must be <= steps ({st.steps}), got {st.eval_every}")
    if stages.long is not None and stages.med is None:
        errors.append("stages.long: needs stages.med (long reruns the med survivor with the highest med delta)")
    budget = [(n, st) for n, st in present if n in ("quick", "med", "long")]
    for (prev, p), (name, st) in zip(budget, budget[1:]):
        if st.steps <= p.steps:
            errors.append(f"stages.{name}.steps: must be greater than {prev}.steps ({p.steps}), got {st.steps}")
    sc = stages.seedcheck
    for name, st in present:
        screen = getattr(st, "screen", None)
        if screen is not None and screen.rungs and max(screen.rungs) > len(st.seeds):
            errors.append(f"stages.{name}.screen.rungs: the last rung needs {max(screen.rungs)} seeds, the stage has "
                          f"{len(st.seeds)}")
    if sc is not None and sc.rule == "sequential":
        selecting = sorted({s for n, st in present if n != "seedcheck" for s in st.seeds} & set(sc.seeds))
        if selecting:
            errors.append(f"stages.seedcheck.seeds: seed {selecting[0]} also screens candidates; the sequential "
                          f"seed check confirms on fresh seeds (leave seeds out for the default pool from "
                          f"{SEQUENTIAL_SEED_OFFSET}, or set rule: fixed for the original's check)")
        if len(sc.seeds) < sc.looks[-1]:
            errors.append(f"stages.seedcheck.seeds: {len(sc.seeds)} seeds; the last look needs {sc.looks[-1]}")
    if sc is not None and sc.rule == "fixed" and len(sc.seeds) < MIN_SEEDCHECK_SEEDS and not sc.allow_few_seeds:
        errors.append(
            f"stages.seedcheck.seeds: {len(sc.seeds)} seeds; a paired sign test cannot reach p<0.05 with fewer than "
            f"{MIN_SEEDCHECK_SEEDS} (its smallest one-sided p is 2^-n = {2.0 ** -len(sc.seeds):.3g}); add seeds or "
            f"set allow_few_seeds: true for a demonstration"
        )
    return errors


def _task_errors(spec: Spec, label: str, task: TaskSpec) -> list[str]:
    where = f"tasks.{label}"
    errors = []
    sc = spec.stages.seedcheck
    if is_comparison(spec.stages) and sc is not None and sc.max_finalists < len(task.candidates):
        errors.append(f"stages.seedcheck.max_finalists: {sc.max_finalists} is less than the {len(task.candidates)} "
                      f"candidates of {where}; a comparison round (seedcheck only) runs every candidate, so raise "
                      f"max_finalists to at least {len(task.candidates)}")
    if not _NAME_RX.match(label):
        errors.append(f"{where}: task label must match {NAME_PATTERN} (no dots or spaces), got {label!r}")
    if task.metric is not None:
        if task.metric in LOWER_IS_BETTER:
            errors.append(f"{where}.metric: {task.metric!r} is lower-is-better; the promotion rule needs a metric "
                          f"where higher is better (e.g. tok_acc)")
        elif task.metric.startswith("val_"):
            errors.append(f"{where}.metric: name the metric without the 'val_' prefix, e.g. "
                          f"{task.metric.removeprefix('val_')!r}")
    if task.batch == "auto" and spec.defaults.device == "cpu" and spec.defaults.probe.cpu_batch is None:
        errors.append(f"{where}.batch: 'auto' needs the GPU batch probe but defaults.device is cpu; give a number "
                      f"or set defaults.probe.cpu_batch")
    names: dict[str, int] = {}
    configs: dict[tuple, str] = {}
    for i, item in enumerate(task.candidates):
        at = f"{where}.candidates[{i}]"
        if item.name == BASELINE.name or item.preset == BASELINE.name:
            errors.append(f"{at}: 'baseline' is implicit (every stage runs the matched baseline); remove it")
            continue
        if not _NAME_RX.match(item.name):
            errors.append(f"{at}.name: must match {NAME_PATTERN}, got {item.name!r}")
            continue
        if item.name in names:
            errors.append(f"{at}: duplicate candidate name {item.name!r} (also candidates[{names[item.name]}])")
            continue
        names[item.name] = i
        try:
            cand = _resolve_candidate(item, spec.defaults.fs)
        except ValueError as e:
            errors.append(f"{at}: {e}{candidate_suggestion(item.preset or item.name)}")
            continue
        signature = (cand.mode, canonical_json(cand.fs.model_dump(mode="json")) if cand.fs else None)
        if signature in configs:
            errors.append(f"{at}: {item.name!r} resolves to the same configuration as {configs[signature]!r} "
                          f"(two names for one run)")
        else:
            configs[signature] = item.name
    return errors


def _resolve_candidate(item: CandidateSpec, fs_defaults: dict[str, Any]) -> Candidate:
    if item.preset is not None:
        base = resolve(item.preset, fs_defaults, item.fs)
        return Candidate(name=item.name, mode=base.mode, fs=base.fs)
    return resolve(item.name, fs_defaults, item.fs)


def _resolve_task_candidates(spec: Spec, label: str) -> list[Candidate]:
    return [_resolve_candidate(item, spec.defaults.fs) for item in spec.tasks[label].candidates]


# ---------------------------------------------------------------------------------------------------------------
# loading
class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        except TypeError:  # an unhashable key: let the default constructor report it
            break
        seen[key] = True
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_error(source: str, e: yaml.YAMLError) -> SpecError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return SpecError(f"{source}: YAML error{where}: {problem}")


def parse_spec_text(text: str, source: str = "<spec>") -> Spec:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise _yaml_error(source, e) from None
    except RecursionError:
        raise SpecError(f"{source}: YAML nesting too deep") from None
    if data is None:
        raise SpecError(f"{source}: the spec is empty")
    return parse_spec(data)


def parse_spec(data: Any) -> Spec:
    """A Spec from already-parsed data (a dict): schema and structural rules. SpecError on any problem."""
    if not isinstance(data, dict):
        raise SpecError(f"spec: must be a mapping of round, model, stages, tasks..., got {type(data).__name__}")
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith(EXTENSION_PREFIX))}
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise spec_error(e, Spec) from None
    except RecursionError:
        raise SpecError("spec: recursive or too deeply nested structure") from None


def load_spec(path: str | Path) -> Spec:
    """Read, parse and structurally validate a spec file. Raises SpecError (one line naming the field)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{p}: spec file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{p}: cannot read the spec file ({type(e).__name__}: {e})") from None
    spec = parse_spec_text(text, str(p))
    spec._source = p
    return spec


def find_spec_file(arg: str | Path) -> Path:
    """`round22.yaml`, `round22`, `studies/round22.yaml` or a path: the spec file meant. SpecError if none."""
    arg = str(arg)
    tried: list[Path] = []
    names = [arg] + ([arg + s for s in SPEC_SUFFIXES] if not arg.endswith(SPEC_SUFFIXES) else [])
    for folder in (Path("."), Path("studies"), STUDIES_DIR):
        for name in names:
            p = folder / name
            if p not in tried:
                tried.append(p)
            if p.is_file():
                return p
    raise SpecError(f"spec file {arg!r} not found (looked for {', '.join(str(t) for t in tried[:4])}, ...)")


# ---------------------------------------------------------------------------------------------------------------
# the checks beyond the schema, re-exported
_CHECKS = frozenset({"SpecCheck", "check_spec", "source_path", "validate_spec"})


def __getattr__(name: str) -> Any:
    """`orchestrator.spec.validate_spec` and the other names of orchestrator.spec_checks, looked up on first use:
    that module imports this one (its checks read the schema), so importing it here at the top would be a cycle."""
    if name in _CHECKS:
        from orchestrator import spec_checks

        return getattr(spec_checks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
