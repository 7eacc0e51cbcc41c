"""What the commands of `fsearch` (orchestrator/cli.py) share: exit codes, finding a round folder or a spec, a
round's storage URL, the live display's interrupt, writing the report with its warnings."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from orchestrator.errors import UserError, one_line
from orchestrator.export import sync_mirror
from orchestrator.paths import RoundPaths
from orchestrator.report import write_report
from orchestrator.report.rates import RATES_REPLICATES
from orchestrator.spec import Spec, find_spec_file, load_spec, validate_spec

# orchestrator.study and orchestrator.scheduler import Optuna (and orchestrator.claims SQLAlchemy) at their top:
# the commands that need a study import them when they run, so status, validate, export and report start without.

EXIT_USER = 2
EXIT_INTERRUPTED = 130
RESULTS_ENV = "FSEARCH_RESULTS"
DEFAULT_RESULTS = "results"


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


def run_with_display(run, display, interrupted: str):
    """run() with the live display closed however it ends; Ctrl-C prints `interrupted` and exits 130."""
    try:
        return run()
    except KeyboardInterrupt:
        pass
    finally:
        getattr(display, "close", lambda: None)()
    click.echo(interrupted, err=True)
    sys.exit(EXIT_INTERRUPTED)


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
