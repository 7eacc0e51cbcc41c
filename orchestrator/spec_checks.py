"""The checks of a spec beyond its schema: against the model, the task registry and the data.

    spec = load_spec(find_spec_file("round22"))      # orchestrator.spec: schema + structure
    warnings = validate_spec(spec)                    # here: SpecError on the first problem (all in `.errors`)

What the checks add to the schema's structural rules:
- the model: preset known and its shape overrides fit (head_size divides n_embd), or checkpoint present (layer
  count read without torch, model/ckpt_meta.py), for the round's model and every task's own;
- every FS candidate acts on its task's model's layers (FSConfig.check_for_model: errors are fatal, warnings
  returned);
- task kinds registered, task params valid, the decision metric reported by the task; a task that executes
  model-written code needs the sandbox unless `defaults.sandbox: unsafe`; data available (task.check_available())
  when check_data is true.

orchestrator.spec re-exports validate_spec and check_spec. Torch-free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from model.ckpt_meta import CheckpointError, read_checkpoint_meta
from model.config import PRESETS
from model.tokenizers import TokenizerUnavailable, get_tokenizer
from orchestrator.runconfig import ModelSource
from orchestrator.spec import LOWER_IS_BETTER, MIN_SEEDCHECK_SEEDS, Spec, TaskSpec
from orchestrator.spec_errors import SpecError, did_you_mean, loc_str, pydantic_message
from tasks import TaskError, get_task, task_class, task_names
from tasks.sandbox import unavailable_reason as sandbox_unavailable_reason


@dataclass
class SpecCheck:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_layer: int | None = None  # of the round's model (spec.model)
    tokenizer: str | None = None
    task_models: dict[str, tuple[int | None, str | None]] = field(default_factory=dict)  # label -> (n_layer, tokenizer)


def source_path(source: ModelSource) -> Path | None:
    """A model source's checkpoint as a path (env vars and ~ expanded; relative to the working directory)."""
    if source.checkpoint is None:
        return None
    return Path(os.path.expandvars(os.path.expanduser(source.checkpoint)))


def check_spec(spec: Spec, *, check_data: bool = True, model_layers: int | None = None) -> SpecCheck:
    """Every problem (errors) and caution (warnings) of a loaded spec. `model_layers` stands in for a checkpoint's
    layer count when the file is absent (tests, dry validation); with check_data the checkpoint must exist anyway."""
    check = SpecCheck()
    check.n_layer, check.tokenizer = _check_model(spec.model, "model", check, check_data, model_layers)
    sc = spec.stages.seedcheck
    if sc is not None and len(sc.seeds) < MIN_SEEDCHECK_SEEDS:
        check.warnings.append(f"stages.seedcheck.seeds: only {len(sc.seeds)} seeds (allow_few_seeds): seed-check "
                              f"results are a demonstration, not a significance test")
    for label, task in spec.tasks.items():
        facts = (check.n_layer, check.tokenizer) if task.model is None else \
            _check_model(task.model, f"tasks.{label}.model", check, check_data, model_layers)
        check.task_models[label] = facts
        _check_candidates(spec, label, facts[0], check)
        _check_task(spec, label, task, check, check_data, facts[1])
    return check


def validate_spec(spec: Spec, *, check_data: bool = True, model_layers: int | None = None) -> list[str]:
    """Raise SpecError on the first problem (all of them in `.errors`); return the warnings."""
    check = check_spec(spec, check_data=check_data, model_layers=model_layers)
    if check.errors:
        raise SpecError.from_list(check.errors)
    return check.warnings


def _check_model(source: ModelSource, where: str, check: SpecCheck, check_data: bool, model_layers: int | None) \
        -> tuple[int | None, str | None]:
    """(layer count, tokenizer) of a model source, None where unknown; its problems go to check.errors."""
    if source.preset is not None:
        if source.preset not in PRESETS:
            check.errors.append(f"{where}.preset: unknown model preset {source.preset!r}; known presets: "
                                f"{', '.join(sorted(PRESETS))}")
            return None, None
        try:
            cfg = source.build_config()
        except ValueError as e:
            check.errors.append(f"{where}.shape.{e} (preset {source.preset!r})")
            return None, None
        return cfg.n_layer, cfg.tokenizer
    n_layer = tokenizer = None
    path = source_path(source)
    assert path is not None
    if path.exists():
        try:
            meta = read_checkpoint_meta(path)
            n_layer, tokenizer = meta["n_layer"], meta.get("tokenizer") or "world"
        except CheckpointError as e:
            check.errors.append(f"{where}.checkpoint: {e}")
    elif check_data:
        check.errors.append(f"{where}.checkpoint: {path} not found (relative paths are relative to the working "
                            f"directory {Path.cwd()})")
    elif model_layers is None:
        check.errors.append(f"{where}.checkpoint: {path} not found; its layer count is needed to validate the "
                            f"candidates")
    if model_layers is not None:
        n_layer, tokenizer = model_layers, tokenizer or "world"
    return n_layer, tokenizer


def _check_candidates(spec: Spec, label: str, n_layer: int | None, check: SpecCheck) -> None:
    if n_layer is None:
        return
    for i, cand in enumerate(spec.candidates(label)):
        at = f"tasks.{label}.candidates[{i}] ({cand.name})"
        if cand.fs is None:
            continue
        try:
            for w in cand.fs.check_for_model(n_layer):
                check.warnings.append(f"{at}: {w}")
        except ValueError as e:
            check.errors.append(f"{at}: {e}")


def _check_task(spec: Spec, label: str, task: TaskSpec, check: SpecCheck, check_data: bool,
                tokenizer: str | None) -> None:
    where = f"tasks.{label}"
    try:
        cls = task_class(task.task)
    except TaskError as e:
        check.errors.append(f"{where}.task: {e}{did_you_mean(task.task, task_names())}")
        return
    try:
        cls.Params.model_validate(task.params)
    except ValidationError as e:
        err = e.errors()[0]
        check.errors.append(f"{where}.params{'.' if err.get('loc') else ''}{loc_str(tuple(err.get('loc', ())))}: "
                            f"{pydantic_message(err)}")
        return
    except Exception as e:  # a Params validator that raised something else: still the params' fault
        check.errors.append(f"{where}.params: invalid ({type(e).__name__}: {e})")
        return
    metrics = {cls.primary_metric, "tok_acc", "exact", *cls.unit_metrics}
    if task.metric is not None and task.metric not in metrics and task.metric not in LOWER_IS_BETTER:
        check.errors.append(f"{where}.metric: task {task.task!r} reports no metric {task.metric!r}; it reports "
                            f"{', '.join(sorted(metrics))}")
    if spec.defaults.sandbox == "enforced" and hasattr(cls, "sandbox_mode"):  # the task executes model-written code
        reason = sandbox_unavailable_reason()
        if reason is not None:
            check.errors.append(f"{where}: {reason}")
    if not check_data or tokenizer is None:
        return
    try:
        tok = get_tokenizer(tokenizer)
    except TokenizerUnavailable as e:
        check.errors.append(f"{where}: the model's tokenizer {tokenizer!r} is unavailable: {e}")
        return
    try:
        get_task(task.task, task.params, tok, spec.defaults.data_seed).check_available()
    except TaskError as e:  # DataUnavailable is a TaskError
        check.errors.append(f"{where}: {e}")
