"""The commands that read rather than run a round: report, export, validate, simulate, list, fetch, bench.
Registered on the command group in orchestrator/cli.py."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import click

from orchestrator.catalog import format_list
from orchestrator.cli_shared import load_spec_arg, resolve_round, sync_shared_mirror, write_report_and_warn
from orchestrator.errors import UserError
from orchestrator.export import export_round
from orchestrator.fetch import fetch, format_manifest
from orchestrator.report import check_report
from orchestrator.report.rates import RATES_REPLICATES
from orchestrator.simulate import run_command as simulate_protocol
from orchestrator.simulate import validate_noise


@click.command("report")
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


@click.command("export")
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


@click.command("validate")
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


@click.command("simulate")
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
    "round": "orchestrator.bench_round",
}


@click.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                        "help_option_names": []})
@click.argument("what", metavar="{" + "|".join(sorted(BENCHES)) + "}", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def bench_cmd(ctx: click.Context, what: str | None, args: tuple[str, ...]) -> None:
    """Benchmarks: kernel, operator, model, train, round (arguments go to the benchmark; try `bench round --help`)."""
    if what in (None, "-h", "--help"):  # the benchmark's own options go through, so the group's help is asked here
        click.echo(ctx.get_help())
        return
    if what not in BENCHES:
        raise click.UsageError(f"unknown benchmark {what!r}; known: {', '.join(sorted(BENCHES))}", ctx)
    code = importlib.import_module(BENCHES[what]).main(list(args))
    sys.exit(code or 0)


@click.command("list")
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


@click.command("fetch")
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
