"""`fsearch`: the command line (console script orchestrator.cli:main).

    fsearch round --spec studies/demo.yaml        run (or resume) a round
    fsearch round --spec F --storage postgresql://... --workers 3    ... with 3 worker processes (one GPU each)
    fsearch worker --round NAME --storage postgresql://...           join a round from any host
    fsearch status ROUND                          the round's table, from another shell (read-only, no lock)
    fsearch export ROUND --format csv -o x.csv    records as jsonl / csv / parquet
    fsearch validate --spec FILE                  check a spec before any compute
    fsearch run --task sudoku --candidate ...     one run by hand
    fsearch report ROUND [--check]                write (or check) the round's report
    fsearch bench kernel|operator|model|train|round ... benchmarks (arguments passed through)

User errors (bad spec, bad flag, unknown round, locked round) end in one line `error: ...` on stderr and exit code 2,
never a traceback; internal errors keep their traceback. Torch is imported only by the worker subprocess and the
bench commands, so status/export/validate start fast.

This module is the command group, its mapping of exceptions to exit codes and the entry point; the commands live in
modules by job and are added to the group below: orchestrator/cli_round.py (round, worker, status), cli_run.py (run),
cli_read.py (report, export, validate, simulate, list, fetch, bench), cli_shared.py (what they share).
"""
from __future__ import annotations

import sys

import click

from orchestrator.cli_read import BENCHES, bench_cmd, export_cmd, fetch_cmd, list_cmd, report_cmd, simulate_cmd, \
    validate_cmd
from orchestrator.cli_round import round_cmd, status_cmd, worker_cmd_
from orchestrator.cli_run import run_cmd
from orchestrator.cli_shared import EXIT_INTERRUPTED, EXIT_USER
from orchestrator.errors import UserError, one_line

__all__ = ["BENCHES", "EXIT_INTERRUPTED", "EXIT_USER", "FsearchGroup", "cli", "entry", "main"]


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


for command in (round_cmd, worker_cmd_, status_cmd, run_cmd, report_cmd, export_cmd, validate_cmd, simulate_cmd,
                bench_cmd, list_cmd, fetch_cmd):
    cli.add_command(command)


# ---------------------------------------------------------------------------------------------------------------------
# entry point

def main(argv: list[str] | None = None) -> int:
    """Console script entry point: returns the exit code (0 ok, 1 a run failed, 2 user error, 130 interrupted)."""
    return cli.main(args=argv, prog_name="fsearch", standalone_mode=False)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
