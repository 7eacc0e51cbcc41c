"""`fsearch round`, `fsearch worker`, `fsearch status`: running a round (alone or with workers on a shared storage)
and watching it. Registered on the command group in orchestrator/cli.py."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from orchestrator.cli_shared import load_spec_arg, remember_storage, resolve_round, run_with_display, storage_url_for, \
    write_report_and_warn
from orchestrator.errors import UserError
from orchestrator.paths import RoundPaths
from orchestrator.progress import format_summary, make_display, rich_table
from orchestrator.spec import Spec, find_spec_file, load_spec, parse_spec_text, validate_spec
from orchestrator.status import format_table, round_status

# orchestrator.study and orchestrator.scheduler import Optuna (and orchestrator.claims SQLAlchemy) at their top:
# the commands that need a study import them when they run, so status, validate, export and report start without.


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


@click.command("round")
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

        records = run_with_display(run, display, f"interrupted; run the same command to resume ({round_dir})")
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


@click.command("worker")
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
    records = run_with_display(sched.run, display, f"interrupted; worker {sched.worker_id} gave its unit back")
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


@click.command("status")
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
