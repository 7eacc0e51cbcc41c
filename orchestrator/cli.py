"""`fsearch`: the command line (console script orchestrator.cli:main).

    fsearch round --spec studies/demo.yaml        run (or resume) a round
    fsearch round --spec F --storage postgresql://... --workers 3    ... with 3 worker processes (one GPU each)
    fsearch worker --round NAME --storage postgresql://...           join a round from any host
    fsearch status ROUND                          the round's table, from another shell (read-only, no lock)
    fsearch export ROUND --format csv -o x.csv    records as jsonl / csv / parquet
    fsearch validate --spec FILE                  check a spec before any compute
    fsearch run --task sudoku --candidate ...     one run by hand
    fsearch report ROUND [--check]                write (or check) the round's report
    fsearch bench kernel|operator|model|train ... benchmarks (arguments passed through)

User errors (bad spec, bad flag, unknown round, locked round) end in one line `error: ...` on stderr and exit code 2,
never a traceback; internal errors keep their traceback. Torch is imported only by the worker subprocess and the
bench commands, so status/export/validate start fast.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

import click

from model.candidates import resolve
from orchestrator import paths
from orchestrator.errors import UserError, one_line
from orchestrator.catalog import format_list
from orchestrator.export import export_round, sync_mirror
from orchestrator.fetch import fetch, format_manifest
from orchestrator.fileio import write_text_atomic
from orchestrator.outcomes import classify
from orchestrator.paths import RoundPaths
from orchestrator.processes import read_progress, start_worker, worker_command, worker_environment
from orchestrator.progress import format_summary, format_table, make_display, rich_table, round_status
from orchestrator.report import check_report, write_report
from orchestrator.report.rates import RATES_REPLICATES
from orchestrator.runconfig import LearningRates, ModelSource, RunConfig
from orchestrator.simulate import run_command as simulate_protocol
from orchestrator.simulate import validate_noise
from orchestrator.spec import Spec, find_spec_file, load_spec, parse_spec_text, validate_spec
from tasks import task_class

# orchestrator.study and orchestrator.scheduler import Optuna (and orchestrator.claims SQLAlchemy) at their top:
# the commands that need a study import them when they run, so status, validate, export and report start without.

EXIT_USER = 2
EXIT_INTERRUPTED = 130
RESULTS_ENV = "FSEARCH_RESULTS"
DEFAULT_RESULTS = "results"


# ---------------------------------------------------------------------------------------------------------------------
# shared helpers

def resolve_round(arg: str, results: str | None = None) -> Path:
    """ROUND: a path to a round folder, or a round name under the results root ($FSEARCH_RESULTS or ./results)."""
    p = Path(arg)
    if RoundPaths(p).is_round():
        return p
    root = Path(results or os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS)
    q = root / arg
    if "/" not in arg and RoundPaths(q).is_round():
        return q
    raise UserError(f"unknown round {arg!r}: no round folder {q if '/' not in arg else p} (give a round name under "
                    f"{root}/ or the path of a round folder)")


def load_spec_arg(arg: str, *, check_data: bool = True) -> tuple[Spec, list[str]]:
    """find + load + validate a spec; returns (spec, warnings)."""
    spec = load_spec(find_spec_file(arg))
    warnings = validate_spec(spec, check_data=check_data)
    return spec, warnings


def load_round_spec(round_dir: Path) -> Spec | None:
    """The spec copy a round keeps in its folder (structure only: no model or data checks), or None."""
    path = RoundPaths(round_dir).spec
    if not path.exists():
        return None
    try:
        return load_spec(path)
    except Exception:  # noqa: BLE001 - status works from the records alone when the spec copy cannot be read
        return None


def read_side_storage(round_dir: Path, override: str | None) -> tuple[str, str]:
    """(storage URL, round name) for the commands that read a round folder: --storage, else the URL the round ran
    with (<round>/storage.json), else its spec copy's, else the folder's SQLite file."""
    from orchestrator.study import round_storage_url  # imports Optuna

    spec = load_round_spec(round_dir)
    return round_storage_url(round_dir, spec, override), (spec.round if spec is not None else round_dir.name)


def sync_shared_mirror(round_dir: Path, override: str | None) -> int:
    """A PostgreSQL round: bring this host's records.jsonl up to the database (nothing for SQLite); how many records
    were appended."""
    from orchestrator.study import StudyError, saved_storage  # imports Optuna

    url, name = read_side_storage(round_dir, override)
    try:
        return len(sync_mirror(round_dir, url, name))
    except StudyError as e:
        saved = saved_storage(round_dir) if override is None else None
        hint = f" ({saved.password_hint})" if saved is not None and saved.password_removed else ""
        raise UserError(f"{one_line(e)}{hint}") from None


def remember_storage(round_dir: Path, url: str) -> None:
    """Keep the storage URL in the round folder (status/export/report find it there); say so when its password was
    left out."""
    from orchestrator.study import save_storage_url  # imports Optuna

    saved = save_storage_url(round_dir, url)
    if saved is not None and saved.password_removed:
        click.echo(f"note: {RoundPaths(round_dir).storage} keeps the storage URL without its password; status, export "
                   f"and report read the password from PGPASSWORD or ~/.pgpass (or take --storage URL)", err=True)


def storage_url_for(spec: Spec, round_dir: Path, override: str | None = None) -> str:
    from orchestrator.study import check_storage_url, default_storage_url  # imports Optuna

    url = override or getattr(spec, "storage", None) or default_storage_url(round_dir)
    check_storage_url(url)
    return url


class ClaimsTiming(click.Option):
    """A float option whose default is a constant of orchestrator.claims, read only when the command runs or its help
    is shown (that module imports SQLAlchemy, which other commands need not pay for)."""

    def __init__(self, *args, constant: str, **kw):
        super().__init__(*args, type=float, default=lambda: _claims_constant(constant), **kw)
        self.constant = constant

    def get_help_extra(self, ctx: click.Context):
        extra = super().get_help_extra(ctx)
        extra["default"] = f"{_claims_constant(self.constant):g}"
        return extra


def _claims_constant(name: str) -> float:
    return float(getattr(importlib.import_module("orchestrator.claims"), name))


# ---------------------------------------------------------------------------------------------------------------------
# commands

# click >= 8.2 raises this for a group called without a command (older versions print the help and exit 0)
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class FsearchGroup(click.Group):
    """The command group; its `main` maps exceptions to exit codes for the console script and CliRunner alike:
    user errors -> `error: ...` on stderr + exit 2; interrupts -> 130; bugs keep their traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        code = self._run(args, prog_name or "fsearch", complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args, prog_name, complete_var, **extra) -> int:
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
            return rv if isinstance(rv, int) else 0
        except click.exceptions.Exit as e:
            return e.exit_code
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            return EXIT_INTERRUPTED
        except _NO_ARGS_IS_HELP as e:  # bare `fsearch`: the help, not an error line
            click.echo(e.ctx.get_help() if e.ctx is not None else e.format_message())
            return 0
        except click.UsageError as e:
            hint = f" (see: {e.ctx.command_path} --help)" if e.ctx is not None else ""
            click.echo(f"error: {one_line(e.format_message())}{hint}", err=True)
            return EXIT_USER
        except click.ClickException as e:
            click.echo(f"error: {one_line(e.format_message())}", err=True)
            return e.exit_code
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            return EXIT_INTERRUPTED
        except UserError as e:
            errors = list(getattr(e, "errors", None) or [])  # a spec's problems: every one, each on its own line
            if len(errors) > 1:
                click.echo(f"error: the spec has {len(errors)} problems:", err=True)
                for message in errors:
                    click.echo(f"  {one_line(message)}", err=True)
            else:
                click.echo(f"error: {one_line(e)}", err=True)
            return EXIT_USER


@click.group(cls=FsearchGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="fsearch", prog_name="fsearch", message="%(prog)s %(version)s")
def cli() -> None:
    """fsearch: staged, baseline-matched search of Future-Seed variants for RWKV-7 post-training."""


def _run_with_display(run, display, interrupted: str):
    """run() with the live display closed however it ends; Ctrl-C prints `interrupted` and exits 130."""
    try:
        return run()
    except KeyboardInterrupt:
        pass
    finally:
        getattr(display, "close", lambda: None)()
    click.echo(interrupted, err=True)
    sys.exit(EXIT_INTERRUPTED)


@cli.command("round")
@click.option("--spec", "spec_arg", required=True, help="spec file (a name also finds studies/NAME.yaml)")
@click.option("--storage", default=None,
              help="Optuna storage URL (default: sqlite:///<round folder>/study.db; postgresql://... for several "
                   "workers)")
@click.option("--workers", default=1, show_default=True, type=int,
              help="worker processes on this host, one device each (more than 1 needs a PostgreSQL storage)")
@click.option("--gpu", default=None,
              help="CUDA_VISIBLE_DEVICES for the worker processes; with --workers N a comma list, one per worker")
@click.option("--no-report", is_flag=True, help="do not write the report at the end (fsearch report ROUND does)")
@click.option("--new-version", is_flag=True,
              help="the spec changes the runs of a round that already has some: run it as round NAME.v2 (v3, ...) "
                   "beside it instead of refusing")
@click.option("--heartbeat-s", type=float, default=None,
              help="PostgreSQL storage: claim heartbeat interval in seconds (default: as for `fsearch worker`)")
@click.option("--stale-after-s", type=float, default=None,
              help="PostgreSQL storage: a claim without heartbeat this long is taken over by another worker (default: "
                   "as for `fsearch worker`)")
@click.option("--worker-cmd", default=None, hidden=True, help="worker command (default: python -m worker)")
def round_cmd(spec_arg: str, storage: str | None, workers: int, gpu: str | None, no_report: bool, new_version: bool,
              heartbeat_s: float | None, stale_after_s: float | None, worker_cmd: str | None) -> None:
    """Run a round: every stage of every task, resumable (run the same command again after a crash)."""
    from orchestrator.pool import WorkerPool, pool_devices  # imports Optuna
    from orchestrator.scheduler import scheduler_for  # imports Optuna
    from orchestrator.study import is_shared_storage, require_shared_storage  # imports Optuna

    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    spec, warnings = load_spec_arg(spec_arg)
    url = storage_url_for(spec, Path(spec.round_dir), storage)
    if workers > 1:
        require_shared_storage(url, f"--workers {workers}")
    shared = is_shared_storage(url)
    spec = bind_round_spec(spec, url if shared else None, new_version)
    round_dir = Path(spec.round_dir)
    if storage is None and not shared:
        url = storage_url_for(spec, round_dir)  # a new version's own study.db
    if not shared and (heartbeat_s is not None or stale_after_s is not None):
        raise UserError("--heartbeat-s/--stale-after-s: only for a PostgreSQL storage (claims of several workers)")
    timing = {k: v for k, v in (("heartbeat_s", heartbeat_s), ("stale_after_s", stale_after_s)) if v is not None}
    display = make_display(sys.stdout)
    devices = pool_devices(workers, gpu, spec.defaults.device) if workers > 1 else None
    sched = scheduler_for(spec, round_dir=round_dir, storage_url=url, worker_cmd=worker_cmd, display=display,
                          devices=gpu if workers == 1 else None, **timing)
    sched.acquire()  # a second coordinator stops here, with one line
    try:
        remember_storage(round_dir, url)
        for w in warnings:
            click.echo(f"warning: {w}", err=True)

        def run():
            if workers > 1:
                spec_file = spec.source or find_spec_file(spec_arg)
                return WorkerPool(sched, workers, spec_file, devices).run()  # type: ignore[arg-type]
            return sched.run()

        records = _run_with_display(run, display, f"interrupted; run the same command to resume ({round_dir})")
    finally:
        sched.release()
    try:
        plan = sched.plan()
    except Exception:  # noqa: BLE001 - the summary works without the planner's words
        plan = None
    click.echo("")
    click.echo(f"round {spec.round} finished: {len(records)} runs recorded in {RoundPaths(round_dir).records}")
    click.echo(format_summary(records, plan, list(spec.tasks)))
    from orchestrator.progress import mixed_conditions

    for line in mixed_conditions(records):
        click.echo(f"warning: {line}", err=True)
    if not no_report:
        write_report_and_warn(round_dir, prefix="report: ")


def bind_round_spec(spec: Spec, shared_url: str | None, new_version: bool) -> Spec:
    """The spec a round runs: `spec` itself unless its round keeps (in its folder, or in the study of a shared
    storage) a spec whose runs it changes: then SpecChanged, or with --new-version the next version of the round
    (claim_strategy.versioned_round). Checked before the round folder is touched; the strategy checks again under the
    round's lock."""
    from orchestrator.claim_strategy import check_spec_copy, spec_change, spec_changed_error, versioned_round
    from orchestrator.study import stored_spec_text  # imports Optuna

    def stored(name: str) -> str | None:
        """The study's spec; None also where it cannot be read yet (a fresh database: the scheduler's own check under
        its claim tables still binds the round)."""
        if shared_url is None:
            return None
        try:
            return stored_spec_text(shared_url, name)
        except UserError:
            return None

    if new_version:
        bound = versioned_round(spec, stored)
        if bound.round != spec.round:
            click.echo(f"--new-version: round {spec.round} keeps another spec; running this one as round "
                       f"{bound.round} ({bound.round_dir})", err=True)
        return bound
    check_spec_copy(spec, Path(spec.round_dir))
    kept = stored(spec.round)
    if kept is not None:
        where = f"the study of round {spec.round}"
        changes = spec_change(kept, spec, where)
        if changes:
            raise spec_changed_error(spec, changes, where)
    return spec


def write_report_and_warn(round_dir: Path, prefix: str = "", rates: bool = False,
                          replicates: int = RATES_REPLICATES) -> None:
    """Write the round's report, print where, and print the findings that must not wait for someone to open it:
    repeated configurations that did not reproduce, runs of different conditions in one slot, runs without the
    sandbox."""
    path = write_report(round_dir, rates=rates, replicates=replicates)
    click.echo(f"{prefix}{path}")
    try:
        summary = json.loads((Path(path).parent / "summary.json").read_text())
        repeats = summary.get("repeats") or {}
    except (OSError, ValueError, AttributeError):
        return  # the report was written; what it says is read from it, not guessed
    if summary.get("mixed_conditions"):
        click.echo(f"warning: {len(summary['mixed_conditions'])} run(s) share a task, stage, candidate and seed with "
                   f"runs of other conditions: set apart, not pooled (see the report's first section)", err=True)
    unsafe = (summary.get("sandbox") or {}).get("unsafe_runs") or []
    if unsafe:
        click.echo(f"warning: {len(unsafe)} run(s) executed model-written code with sandbox: unsafe", err=True)
    if repeats.get("differing"):
        click.echo(f"warning: not reproducible: {repeats['differing']} of {len(repeats['groups'])} configurations "
                   f"that ran in more than one stage gave different final metrics (see the report's first section)",
                   err=True)


@cli.command("worker")
@click.option("--round", "round_name", required=True, help="the round's name (its study in the storage)")
@click.option("--storage", required=True, help="the round's PostgreSQL storage URL (postgresql://USER@HOST:PORT/DB)")
@click.option("--spec", "spec_arg", default=None,
              help="spec file (default: the spec the round's study keeps, written by `fsearch round`)")
@click.option("--results", default=None,
              help="results root on this host; the round folder is RESULTS/ROUND (default: the spec's output)")
@click.option("--gpu", default=None, help="CUDA_VISIBLE_DEVICES for this worker's runs")
@click.option("--heartbeat-s", cls=ClaimsTiming, constant="HEARTBEAT_S",
              help="seconds between two refreshes of this worker's claim")
@click.option("--stale-after-s", cls=ClaimsTiming, constant="STALE_AFTER_S",
              help="seconds without heartbeat after which another worker may take this worker's unit over")
@click.option("--wait-s", cls=ClaimsTiming, constant="WAIT_S",
              help="seconds to wait before looking again when other workers hold every runnable unit")
@click.option("--worker-id", default=None, hidden=True, help="claim owner name (default host:pid:hostid)")
@click.option("--worker-cmd", default=None, hidden=True, help="worker command (default: python -m worker)")
def worker_cmd_(round_name: str, storage: str, spec_arg: str | None, results: str | None, gpu: str | None,
                heartbeat_s: float, stale_after_s: float, wait_s: float, worker_id: str | None,
                worker_cmd: str | None) -> None:
    """Join a round on a shared (PostgreSQL) storage: claim its runnable units one at a time, run and record them,
    until the plan is finished. Start any number, on any number of hosts; each claim is atomic, a stage's units
    start only when the stage before is recorded, and a dead worker's unit is taken over after its heartbeat
    timeout."""
    from orchestrator.scheduler import SharedScheduler  # imports Optuna
    from orchestrator.study import require_shared_storage  # imports Optuna

    require_shared_storage(storage, "fsearch worker")
    spec, warnings = _worker_spec(round_name, storage, spec_arg, results)
    round_dir = Path(results) / spec.round if results else Path(spec.round_dir)
    remember_storage(round_dir, storage)
    display = make_display(sys.stdout)
    sched = SharedScheduler(spec, round_dir=round_dir, storage_url=storage, worker_cmd=worker_cmd, display=display,
                            devices=gpu, worker_id=worker_id, heartbeat_s=heartbeat_s, stale_after_s=stale_after_s,
                            wait_s=wait_s)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    records = _run_with_display(sched.run, display, f"interrupted; worker {sched.worker_id} gave its unit back")
    click.echo(f"worker {sched.worker_id}: round {spec.round} has no work left; {len(sched.recorded_here)} run(s) "
               f"recorded by this worker, {len(records)} in the round ({RoundPaths(round_dir).records})")


def _worker_spec(round_name: str, storage: str, spec_arg: str | None, results: str | None) \
        -> tuple[Spec, list[str]]:
    """The spec a worker runs: --spec, else the text the round's study keeps (copied to the round folder)."""
    from orchestrator.study import stored_spec_text  # imports Optuna

    if spec_arg is not None:
        spec, warnings = load_spec_arg(spec_arg)
        if spec.round != round_name:
            raise UserError(f"--spec: the spec's round is {spec.round!r}, not --round {round_name!r}")
        return spec, warnings
    text = stored_spec_text(storage, round_name)
    if text is None:
        raise UserError(f"round {round_name!r} has no spec in that storage yet: start it with `fsearch round --spec "
                        f"FILE --storage URL`, or give this worker --spec FILE")
    from orchestrator.claim_strategy import save_spec_copy

    parsed = parse_spec_text(text, f"round {round_name} (stored spec)")
    round_dir = Path(results) / round_name if results else Path(parsed.round_dir)
    save_spec_copy(parsed, round_dir, text)  # this host's copy: written once, never replaced by another spec
    spec = load_spec(RoundPaths(round_dir).spec)
    return spec, validate_spec(spec)


@cli.command("status")
@click.argument("round_arg", metavar="ROUND")
@click.option("--results", default=None, help="results root where round names are looked up (default: results)")
@click.option("--storage", default=None,
              help="the round's storage URL (default: the one the round ran with, kept in <round>/storage.json)")
def status_cmd(round_arg: str, results: str | None, storage: str | None) -> None:
    """Show a round's progress (works while the round runs; read-only, takes no lock). A PostgreSQL round's table is
    read from its database, with the workers holding units and their heartbeats."""
    round_dir = resolve_round(round_arg, results)
    st = round_status(round_dir, storage)
    click.echo(st.header)
    if sys.stdout.isatty():
        from rich.console import Console  # rich only for a terminal: piped output starts without it

        Console().print(rich_table(st.rows))
    else:
        click.echo(format_table(st.rows))
    for line in st.notes:
        click.echo(line)


@cli.command("export")
@click.argument("round_arg", metavar="ROUND")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "parquet"]), default="jsonl", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="output file (default: <round>/export/records.<format>)")
@click.option("--results", default=None, help="results root where round names are looked up (default: results)")
@click.option("--storage", default=None,
              help="the round's storage URL (default: the one the round ran with, kept in <round>/storage.json)")
def export_cmd(round_arg: str, fmt: str, output: str | None, results: str | None, storage: str | None) -> None:
    """Export a round's records (the Record fields, including best_val_loss / best_val_tok_acc). A PostgreSQL round's
    records.jsonl is first brought up to its database."""
    round_dir = resolve_round(round_arg, results)
    sync_shared_mirror(round_dir, storage)
    path = export_round(round_dir, fmt, Path(output) if output else None)
    click.echo(str(path))


@cli.command("validate")
@click.option("--spec", "spec_arg", required=True, help="spec file (a name also finds studies/NAME.yaml)")
@click.option("--no-data", is_flag=True, help="skip the data-availability checks")
@click.option("--noise-from", default=None,
              help="a finished round's folder: simulate the spec's error rates under the paired-delta SDs measured "
                   "there (tasks matched by label, else by task and parameters) and warn where the screens are "
                   "mostly noise (default: the spec's own round, when it has records and the spec one-seed "
                   "threshold screens)")
def validate_cmd(spec_arg: str, no_data: bool, noise_from: str | None) -> None:
    """Check a spec (schema, candidates against the model, task parameters, data) without running anything; with
    known noise, also its protocol's error rates (simulated, seconds). Warnings do not change the exit code."""
    spec, warnings = load_spec_arg(spec_arg, check_data=not no_data)
    rate_lines, rate_warnings = validate_noise(spec, noise_from)
    for w in warnings + rate_warnings:
        click.echo(f"warning: {w}", err=True)
    stages = ", ".join(f"{name} {st.steps} steps x{len(st.seeds)} seed(s)" for name, st in spec.stage_list())
    n_cand = sum(len(t.candidates) for t in spec.tasks.values())
    kind = "comparison round (every candidate on every seed, nothing pruned)" if spec.is_comparison else "stages"
    click.echo(f"ok: round {spec.round} -> {spec.round_dir}: {len(spec.tasks)} task(s), {n_cand} candidate(s); "
               f"{kind}: {stages}")
    for line in rate_lines:
        click.echo(line)


@cli.command("run")
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
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
              help="torch.compile the blocks around the WKV kernel while training")
@click.option("--time-limit", type=float, default=3600.0, show_default=True, help="seconds")
@click.option("--out", default=None, help="run folder (default: results/adhoc/<task>.<candidate>.s<seed>-<time>)")
@click.option("--worker-cmd", default=None, hidden=True)
def run_cmd(task_kind, params, candidate, fs_json, steps, eval_every, seed, batch, micro_batch, lr, model_preset,
            checkpoint, n_val, n_test, data_seed, device, kernel, precision, compile_, time_limit, out,
            worker_cmd) -> None:
    """One run by hand, in a worker subprocess, with a progress bar and a one-line summary."""
    def parse_json(flag: str, text: str | None) -> dict | None:
        if text is None:
            return None
        try:
            v = json.loads(text)
        except ValueError as e:
            raise UserError(f"{flag}: not JSON ({e})") from None
        if not isinstance(v, dict):
            raise UserError(f"{flag}: expected a JSON object")
        return v

    task_params = parse_json("--params", params) or {}
    fs = parse_json("--fs", fs_json)
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
                        eval_every=eval_every if eval_every is not None else max(1, steps // 5), n_val=n_val, n_test=n_test, data_seed=data_seed,
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


@cli.command("report")
@click.argument("round_arg", metavar="ROUND")
@click.option("--check", is_flag=True, help="check the existing report against the records instead of writing it")
@click.option("--results", default=None, help="results root where round names are looked up (default: results)")
@click.option("--storage", default=None,
              help="the round's storage URL (default: the one the round ran with, kept in <round>/storage.json)")
@click.option("--rates", is_flag=True,
              help="add the protocol's error rates, simulated under the noise measured in the round (seconds)")
@click.option("--replicates", type=click.IntRange(1, 100_000), default=RATES_REPLICATES, show_default=True,
              help="with --rates: simulated rounds per scenario")
def report_cmd(round_arg: str, check: bool, results: str | None, storage: str | None, rates: bool,
               replicates: int) -> None:
    """Write the round's report (or check it). A PostgreSQL round's records.jsonl is first brought up to its
    database. --check re-derives a report written with --rates, rates included."""
    round_dir = resolve_round(round_arg, results)
    sync_shared_mirror(round_dir, storage)
    if check:
        problems = check_report(round_dir)
        for p in problems:
            click.echo(f"problem: {p}")
        if problems:
            sys.exit(1)
        click.echo("ok: the report matches the records")
        return
    write_report_and_warn(round_dir, rates=rates, replicates=replicates)


@cli.command("simulate")
@click.option("--spec", "spec_args", multiple=True,
              help="simulate this spec's protocol (repeat to compare; default: the original's beside the default)")
@click.option("--noise-from", default=None, help="a finished round's folder: its paired-delta SDs and wall times")
@click.option("--effects", default="0.5,1", show_default=True, help="real effects to test, in SDs (comma list)")
@click.option("--candidates", default=8, show_default=True, type=int, help="candidates of the default protocol")
@click.option("--threshold", default=0.0, show_default=True, type=float, help="threshold of the default protocol")
@click.option("--replicates", default=2000, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--png", default=None, help="write a power-against-cost plot here")
def simulate_cmd(spec_args: tuple[str, ...], noise_from: str | None, effects: str, candidates: int,
                 threshold: float, replicates: int, seed: int, as_json: bool, png: str | None) -> None:
    """A protocol's error rates and cost: the real planner and seed-check rule on synthetic outcomes (no GPU)."""
    try:
        effect_list = [float(e) for e in effects.split(",") if e.strip()]
    except ValueError:
        raise UserError(f"--effects {effects!r}: a comma list of numbers") from None
    click.echo(simulate_protocol(spec_args, noise_from, effect_list, candidates, replicates, seed, as_json, png,
                                 threshold))


# the benchmarks are torch-side: imported by name only when one runs
BENCHES = {
    "kernel": "kernels.bench",
    "operator": "kernels.bench_cpu",
    "model": "model.bench_cpu",
    "train": "worker.bench_train",
}


@cli.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                        "help_option_names": []})
@click.argument("what", metavar="{" + "|".join(sorted(BENCHES)) + "}", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def bench_cmd(ctx: click.Context, what: str | None, args: tuple[str, ...]) -> None:
    """Benchmarks: kernel, operator, model, train (arguments go to the benchmark; try `bench kernel --help`)."""
    if what in (None, "-h", "--help"):  # the benchmark's own options go through, so the group's help is asked here
        click.echo(ctx.get_help())
        return
    if what not in BENCHES:
        raise click.UsageError(f"unknown benchmark {what!r}; known: {', '.join(sorted(BENCHES))}", ctx)
    code = importlib.import_module(BENCHES[what]).main(list(args))
    sys.exit(code or 0)


@cli.command("list")
@click.argument("what", type=click.Choice(["tasks", "candidates", "presets"]))
@click.argument("names", nargs=-1)
@click.option("--params", default=None, help="tasks: parameters as JSON for the chance levels (default: the task's)")
def list_cmd(what: str, names: tuple[str, ...], params: str | None) -> None:
    """What a spec can name: tasks (parameters, metrics and their definitions, chance levels), candidates (the FS
    library), presets (model shapes). `fsearch list tasks sudoku` shows one task."""
    if names and what != "tasks":
        raise UserError(f"list {what}: takes no names (only `list tasks NAME...` does)")
    try:
        task_params = json.loads(params) if params is not None else None
    except ValueError as e:
        raise UserError(f"--params: not JSON ({e})") from None
    if task_params is not None and not isinstance(task_params, dict):
        raise UserError("--params: expected a JSON object")
    click.echo(format_list(what, list(names) or None, task_params))


@cli.command("fetch")
@click.argument("kind", type=click.Choice(["checkpoint", "data", "list"]))
@click.argument("name", required=False)
@click.option("--cache", default=None, help="cache folder (default: $FSEARCH_CACHE, else ~/.cache/fsearch)")
@click.option("--from", "from_dir", default=None, help="take the files from this local folder instead of the network")
@click.option("--manifest", default=None, hidden=True, help="another manifest JSON (tests)")
def fetch_cmd(kind: str, name: str | None, cache: str | None, from_dir: str | None, manifest: str | None) -> None:
    """Download a checkpoint (`fetch checkpoint rwkv7-g1d-0.1b`) or a task's dataset (`fetch data mbpp`) into the
    cache, check its size and sha256, and print the spec lines that use it. `fetch list` shows what can be fetched."""
    if kind == "list":
        click.echo(format_manifest(manifest))
        return
    if name is None:
        raise UserError(f"fetch {kind}: give a name (see `fsearch fetch list`)")
    fetch(kind, name, cache=cache, from_dir=from_dir, manifest=manifest, echo=click.echo)  # FetchError: a UserError


# ---------------------------------------------------------------------------------------------------------------------
# entry point

def main(argv: list[str] | None = None) -> int:
    """Console script entry point: returns the exit code (0 ok, 1 a run failed, 2 user error, 130 interrupted)."""
    return cli.main(args=argv, prog_name="fsearch", standalone_mode=False)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
