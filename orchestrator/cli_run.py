"""`fsearch run`: one run by hand in a worker subprocess, its flags checked (torch-free) before the worker starts.
Registered on the command group in orchestrator/cli.py."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from model.candidates import resolve
from orchestrator import paths
from orchestrator.cli_shared import DEFAULT_RESULTS, EXIT_INTERRUPTED, RESULTS_ENV
from orchestrator.errors import UserError, json_object, one_line
from orchestrator.fileio import write_text_atomic
from orchestrator.outcomes import classify
from orchestrator.processes import WorkerProcess, read_progress, start_worker, worker_command, worker_environment
from orchestrator.runconfig import COMPILE_MODES, LearningRates, ModelSource, RunConfig
from tasks import task_class


@click.command("run")
@click.option("--task", "task_kind", required=True, help="task registry name, e.g. sudoku")
@click.option("--params", default="{}", help="task parameters as JSON, e.g. '{\"base\": 2}'")
@click.option("--candidate", default="baseline", show_default=True, help="library name, baseline or read_twice")
@click.option("--fs", "fs_json", default=None, help="explicit FS fields as JSON (override the library name's)")
@click.option("--steps", type=int, required=True)
@click.option("--eval-every", type=int, default=None, help="default: steps // 5")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch", type=int, default=16, show_default=True, help="effective batch")
@click.option("--micro-batch", type=int, default=None)
@click.option("--lr", type=float, default=None, help="model learning rate")
@click.option("--model-preset", default=None, help="from-scratch model preset (e.g. tiny)")
@click.option("--checkpoint", default=None, help="checkpoint to post-train")
@click.option("--n-val", type=int, default=64, show_default=True)
@click.option("--n-test", type=int, default=64, show_default=True)
@click.option("--data-seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--kernel", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@click.option("--compile", "compile_", type=click.Choice(COMPILE_MODES), default="auto", show_default=True,
              help="how the training step runs: auto (graphs on a GPU, off on CPU), off (eager), on (compiled blocks), "
                   "graphs (compiled blocks, replayed as CUDA graphs), eager-graphs (replays, no compile)")
@click.option("--time-limit", type=float, default=3600.0, show_default=True, help="seconds")
@click.option("--out", default=None, help="run folder (default: results/adhoc/<task>.<candidate>.s<seed>-<time>)")
@click.option("--worker-cmd", default=None, hidden=True)
def run_cmd(task_kind, params, candidate, fs_json, steps, eval_every, seed, batch, micro_batch, lr, model_preset,
            checkpoint, n_val, n_test, data_seed, device, kernel, precision, compile_, time_limit, out,
            worker_cmd) -> None:
    """One run by hand, in a worker subprocess, with a progress bar and a one-line summary."""
    task_params = _json_object_flag("--params", params) or {}
    fs = _json_object_flag("--fs", fs_json)
    if (model_preset is None) == (checkpoint is None):
        raise UserError("give exactly one of --model-preset or --checkpoint")
    cand = _check_run_flags(task_kind, task_params, candidate, fs, model_preset, checkpoint)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_key = f"{task_kind}.adhoc.{cand.name}.s{seed}-{stamp}"
    run_dir = Path(out) if out else Path(os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS) / "adhoc" / run_key
    try:
        cfg = RunConfig(run_key=run_key, task=task_kind, task_kind=task_kind, task_params=task_params,
                        candidate=cand.name, mode=cand.mode, fs=cand.fs,
                        model=ModelSource(preset=model_preset, checkpoint=checkpoint), steps=steps,
                        eval_every=eval_every if eval_every is not None else max(1, steps // 5), n_val=n_val,
                        n_test=n_test, data_seed=data_seed,
                        seed=seed, batch_size=batch, micro_batch=micro_batch,
                        lr=LearningRates(model=lr) if lr is not None else LearningRates(), kernel=kernel,
                        device=device, precision=precision, compile=compile_, run_dir=str(run_dir))
    except ValueError as e:
        raise UserError(_run_flag_error(e)) from None
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    run_file = run_dir / paths.RUN_CONFIG
    write_text_atomic(run_file, cfg.model_dump_json(indent=1))
    worker_log = run_dir / paths.WORKER_LOG
    proc = start_worker(worker_command(worker_cmd) + [str(run_file)], worker_log, env=worker_environment())
    code = _wait_with_progress(proc, run_dir, steps, time_limit)
    outcome = classify(run_dir, code, proc.timed_out, worker_log, time_limit)
    res = outcome.result
    if outcome.kind in ("ok", "diverged") and res is not None:
        metric = res.primary_metric or "tok_acc"
        v = res.final.get("val_" + metric)
        val_loss = res.final.get("val_loss", float("nan"))
        click.echo(f"{outcome.kind}: {task_kind} {cand.name} s{seed}: {res.steps}/{steps} steps, "
                   f"val_{metric}={'-' if v is None else f'{v:.4f}'}, val_loss={val_loss:.4f}, "
                   f"{res.wall_s:.1f} s, {res.tokens_per_s:.0f} tok/s -> {run_dir}")
        if outcome.kind == "diverged":
            sys.exit(1)
        return
    if outcome.kind == "config" and created and not out:  # a setting the worker refused: nothing ran, nothing kept
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        raise UserError(f"{one_line(outcome.message or 'the worker refused the run configuration')}")
    click.echo(f"failed ({outcome.kind}): {outcome.message} -> {run_dir}", err=True)
    sys.exit(1)


def _json_object_flag(flag: str, text: str | None) -> dict | None:
    """A flag's JSON object (None when the flag is not given); UserError naming the flag otherwise."""
    return None if text is None else json_object(text, flag)


def _wait_with_progress(proc: WorkerProcess, run_dir: Path, steps: int, time_limit: float) -> int:
    """The worker's exit code, its progress drawn meanwhile; Ctrl-C kills the worker, prints `interrupted` and exits
    130."""
    bar = _progress_bar(steps)

    def poll() -> None:
        p = read_progress(run_dir)
        if p and p.get("step") is not None:
            bar.update(p["step"], p.get("loss"))

    try:
        code = proc.wait(time_limit, poll=poll)
    except KeyboardInterrupt:
        proc.kill()
        bar.close()
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    poll()
    bar.close()
    return code


RUN_FLAGS = {"batch_size": "--batch", "task_params": "--params", "lr": "--lr", "model": "--model-preset/--checkpoint",
             "compile": "--compile"}


def _run_flag_error(e: ValueError) -> str:
    """A RunConfig validation error as `--flag: problem` (every problem, joined by '; ')."""
    errors = getattr(e, "errors", None)
    if not callable(errors):
        return one_line(e)
    parts = []
    for err in errors():
        loc = [str(x) for x in err.get("loc", ())]
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        named = msg.split(" ", 1)
        if not loc and len(named) == 2 and named[0] in RunConfig.model_fields:  # a check across fields names its own
            loc, msg = [named[0]], named[1]
        flag = RUN_FLAGS.get(loc[0], "--" + loc[0].replace("_", "-")) if loc else "run"
        parts.append(f"{flag}: {msg}" + (f" (got {err.get('input')!r})" if err.get("type") != "value_error" else ""))
    return one_line("; ".join(parts))


def _check_run_flags(task_kind: str, task_params: dict, candidate: str, fs: dict | None, model_preset: str | None,
                     checkpoint: str | None):
    """Everything `fsearch run` can check before a worker starts (torch-free): the task and its parameters, the model
    preset or checkpoint, the candidate and its layers against the model. The resolved candidate, else UserError."""
    from model.ckpt_meta import CheckpointError, read_checkpoint_meta
    from model.config import PRESETS
    from orchestrator.spec import candidate_suggestion, did_you_mean
    from tasks import TaskError, task_names

    try:
        cls = task_class(task_kind)
    except TaskError as e:
        raise UserError(f"--task: {one_line(e)}{did_you_mean(task_kind, task_names())}") from None
    try:
        cls.Params.model_validate(task_params)
    except ValueError as e:
        raise UserError(f"--params: {one_line(e)} (see `fsearch list tasks {task_kind}`)") from None
    try:
        cand = resolve(candidate, None, fs)
    except ValueError as e:
        raise UserError(f"--candidate: {one_line(e)}{candidate_suggestion(candidate)}") from None
    if model_preset is not None:
        if model_preset not in PRESETS:
            raise UserError(f"--model-preset: unknown preset {model_preset!r}; known: {', '.join(sorted(PRESETS))}"
                            f"{did_you_mean(model_preset, sorted(PRESETS))}")
        n_layer = PRESETS[model_preset].n_layer
    else:
        path = Path(os.path.expandvars(os.path.expanduser(str(checkpoint))))
        if not path.exists():
            raise UserError(f"--checkpoint: {path} not found (`fsearch fetch checkpoint NAME` downloads one)")
        try:
            n_layer = read_checkpoint_meta(path)["n_layer"]
        except CheckpointError as e:
            raise UserError(f"--checkpoint: {one_line(str(e))}") from None
    if cand.fs is not None:
        try:
            cand.fs.check_for_model(n_layer)
        except ValueError as e:
            raise UserError(f"--candidate {cand.name}: {one_line(e)}") from None
    return cand


class _progress_bar:
    """tqdm on a terminal, nothing otherwise (the summary line says what happened)."""

    def __init__(self, total: int):
        self.tqdm = None
        self.n = 0
        if sys.stderr.isatty():
            from tqdm import tqdm  # only `fsearch run` on a terminal draws a bar: other commands start without it

            self.tqdm = tqdm(total=total, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float | None) -> None:
        if self.tqdm is None:
            return
        self.tqdm.update(max(0, step - self.n))
        self.n = max(self.n, step)
        if loss is not None:
            self.tqdm.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
