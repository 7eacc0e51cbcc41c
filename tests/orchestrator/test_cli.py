"""The command line: torch-free fast commands, one-line user errors with exit code 2 (never a traceback), internal
errors with their traceback, status/export/run/report/bench wiring."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import cli as cli_mod
from orchestrator import cli_read, cli_shared
from orchestrator.cli import cli
from orchestrator.records import record_columns

REPO = Path(__file__).resolve().parents[2]


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env)


def assert_user_error(result, *needles: str) -> None:
    """One line `error: ...`, or for a spec with several problems a headline and one indented line per problem."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip()
    lines = err.splitlines()
    assert lines and lines[0].startswith("error: "), err
    assert len(lines) == 1 or (lines[0].startswith("error: the spec has ") and len(lines) > 2
                               and all(x.startswith("  ") for x in lines[1:])), err
    assert "Traceback" not in result.output
    for n in needles:
        assert n in err, err


@pytest.fixture(scope="module")
def finished_round(tmp_path_factory, fake_worker_cmd, round_runner, tiny_spec):
    """One round (fake worker) shared by the read-only tests of this module."""
    spec, effects = tiny_spec
    base = tmp_path_factory.mktemp("cli_round")
    path = base / "spec.yaml"
    path.write_text(yaml.safe_dump({**spec, "output": str(base / "results")}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FSEARCH_WORKER_CMD", fake_worker_cmd)
        mp.setenv("FAKE_WORKER_EFFECTS", json.dumps(effects))
        mp.setenv("FAKE_WORKER_STEP_S", "0")
        mp.delenv("FSEARCH_FAULTS", raising=False)
        round_runner(path)
    return base / "results" / "r"


# ---------------------------------------------------------------------------------------------------------------------
# torch-free and fast

def test_status_export_validate_do_not_import_torch(finished_round, tmp_path, write_spec):
    """The read-side commands never import torch (or triton), directly or indirectly."""
    spec = write_spec(name="v.yaml")
    code = f"""
import sys, time
t0 = time.time()
from orchestrator.cli import main
codes = [main(['status', '--help']), main(['status', {str(finished_round)!r}]),
         main(['export', {str(finished_round)!r}, '--format', 'csv', '-o', {str(tmp_path / 'x.csv')!r}]),
         main(['export', {str(finished_round)!r}, '--format', 'parquet', '-o', {str(tmp_path / 'x.parquet')!r}]),
         main(['validate', '--spec', {str(spec)!r}])]
print('RESULT', codes, 'torch' in sys.modules, [m for m in sys.modules if m.startswith(('torch', 'triton'))][:3])
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT"))
    assert line == "RESULT [0, 0, 0, 0, 0] False []", (line, p.stderr[-2000:])


def test_status_help_starts_fast():
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    elapsed = time.time() - t0
    assert p.returncode == 0 and "read-only" in p.stdout
    assert elapsed < 10, elapsed  # about 0.5 s on a quiet 2-core machine; generous for a loaded CI box


# ---------------------------------------------------------------------------------------------------------------------
# user errors: one line, exit 2

def test_bad_flags_and_unknown_rounds(tmp_path, finished_round):
    assert_user_error(invoke("round"), "Missing option '--spec'")
    assert_user_error(invoke("round", "--spec", str(tmp_path / "nope.yaml")), "not found")
    assert_user_error(invoke("round", "--spec", "x", "--workers", "two"), "--workers")
    assert_user_error(invoke("status", "no_such_round"), "unknown round 'no_such_round'")
    assert_user_error(invoke("status", str(tmp_path / "no" / "such")), "unknown round")
    assert_user_error(invoke("export", str(finished_round), "--format", "xls"), "--format")
    assert_user_error(invoke("frobnicate"), "No such command")
    assert_user_error(invoke("bench", "nothing"), "nothing")


def test_several_workers_need_postgresql(write_spec):
    spec = write_spec()
    assert_user_error(invoke("round", "--spec", str(spec), "--workers", "4"), "needs a PostgreSQL storage")
    assert_user_error(invoke("round", "--spec", str(spec), "--workers", "0"), "at least 1")


def test_bad_storage_url(write_spec):
    assert_user_error(invoke("round", "--spec", str(write_spec()), "--storage", "mysql://x/y"), "storage")


def test_round_by_name_under_the_results_root(finished_round):
    r = invoke("status", "r", "--results", str(finished_round.parent))
    assert r.exit_code == 0 and "3/3" in r.stdout
    r = invoke("status", "r", env={"FSEARCH_RESULTS": str(finished_round.parent)})
    assert r.exit_code == 0 and "no scheduler running; 7 runs recorded" in r.stdout


def test_internal_errors_keep_their_traceback(finished_round, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli_read, "export_round", boom)
    r = invoke("export", str(finished_round))
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)


# hypothesis: random and mutated spec files never produce a traceback --------------------------------------------------

VALID = {
    "round": "h", "model": {"preset": "tiny"}, "output": "OUT",
    "defaults": {"n_val": 8, "device": "cpu"},
    "stages": {"quick": {"steps": 4, "eval_every": 2, "seeds": [0]}, "med": {"steps": 8, "eval_every": 4}},
    "tasks": {"sud": {"task": "sudoku", "params": {"base": 2, "mask_count": 4}, "batch": 4, "threshold": 0.01,
                      "candidates": ["scalar_l1_trainable", {"name": "g", "fs": {"layer_start": 2}}]}},
}
PATHS = [("round",), ("model",), ("model", "preset"), ("output",), ("defaults",), ("defaults", "n_val"),
         ("defaults", "device"), ("stages",), ("stages", "quick"), ("stages", "quick", "steps"),
         ("stages", "quick", "seeds"), ("stages", "med", "steps"), ("stages", "med", "eval_every"), ("tasks",),
         ("tasks", "sud"), ("tasks", "sud", "task"), ("tasks", "sud", "params"), ("tasks", "sud", "params", "base"),
         ("tasks", "sud", "batch"), ("tasks", "sud", "threshold"), ("tasks", "sud", "candidates")]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10_000), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(-2, 5), max_size=4),
                   st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
                   st.sampled_from(["auto", "tiny", "sudoku", "quick", "baseline", "scalar_l9_trainable", "cuda"]))


@st.composite
def mutated_spec_text(draw) -> str:
    import copy

    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = data
        for k in path[:-1]:
            parent = parent.get(k) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        op = draw(st.sampled_from(["set", "delete", "extra"]))
        if op == "set":
            parent[path[-1]] = draw(VALUES)
        elif op == "delete":
            parent.pop(path[-1], None)
        else:
            parent[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
    text = yaml.safe_dump(data, sort_keys=False)
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter of the cases: damage the text itself
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.sampled_from([":", "- ", "{", "]", "\t", "\n  x", "'", "&a *a", "!!python/object"])) \
            + text[i:]
    return text


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=mutated_spec_text())
def test_mutated_specs_give_one_line_or_success(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text.replace("OUT", str(tmp_path / "out")))
    r = invoke("validate", "--spec", str(path))
    assert r.exit_code in (0, 2), (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    if r.exit_code == 2:
        assert_user_error(r)
        # `round` stops on the same spec with the same line, before any compute
        r2 = invoke("round", "--spec", str(path), "--no-report")
        assert_user_error(r2)
        assert r2.stderr == r.stderr
        assert not (tmp_path / "out").exists()


@settings(max_examples=20, deadline=None)
@given(argv=st.lists(st.sampled_from(["round", "status", "export", "validate", "run", "--spec", "--format", "csv",
                                      "--workers", "3", "-o", "--steps", "x", "--task", "nosuch", "--help", "ROUNDX",
                                      "--params", "{bad", "--storage", "sqlite://"]), min_size=1, max_size=5))
def test_random_flags_never_trace(argv):
    r = invoke(*argv)
    assert r.exit_code in (0, 2), (argv, r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    if r.exit_code == 2:
        assert_user_error(r)


# ---------------------------------------------------------------------------------------------------------------------
# commands

def test_validate_prints_a_summary(write_spec):
    r = invoke("validate", "--spec", str(write_spec()))
    assert r.exit_code == 0 and r.stdout.startswith("ok: round r")
    assert "only 2 seeds" in r.stderr  # the warning
    assert "stages: quick 4 steps" in r.stdout and "comparison" not in r.stdout


def test_validate_names_a_comparison_round(write_spec):
    spec = write_spec({"stages!": {"seedcheck": {"steps": 6, "eval_every": 3, "seeds": [0, 1, 2, 3, 4],
                                                 "max_finalists": 2}}})
    r = invoke("validate", "--spec", str(spec))
    assert r.exit_code == 0, r.output
    assert "comparison round (every candidate on every seed, nothing pruned): seedcheck 6 steps x5" in r.stdout


def test_export_writes_every_format(finished_round, tmp_path):
    for fmt in ("jsonl", "csv", "parquet"):
        r = invoke("export", str(finished_round), "--format", fmt)
        assert r.exit_code == 0
        out = Path(r.stdout.strip())
        assert out == finished_round / "export" / f"records.{fmt}"
    df = pd.read_parquet(finished_round / "export" / "records.parquet")
    assert list(df.columns) == record_columns() and len(df) == 7
    r = invoke("export", str(finished_round), "--format", "csv", "-o", str(tmp_path / "sub" / "x.csv"))
    assert r.exit_code == 0 and len(pd.read_csv(tmp_path / "sub" / "x.csv")) == 7


def test_run_by_hand_with_the_fake_worker(tmp_path, fake_worker_cmd, monkeypatch):
    monkeypatch.setenv("FAKE_WORKER_STEP_S", "0")
    out = tmp_path / "one"
    r = invoke("run", "--task", "sudoku", "--params", '{"base": 2, "mask_count": 4}', "--candidate",
               "scalar_l1_trainable", "--steps", "6", "--model-preset", "tiny", "--out", str(out),
               "--worker-cmd", fake_worker_cmd)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("ok: sudoku scalar_l1_trainable s0: 6/6 steps, val_hole_acc=")
    cfg = json.loads((out / "run.json").read_text())
    assert (cfg["eval_every"], cfg["mode"], cfg["fs"]["layer_start"]) == (1, "prompt_fs", 1)
    monkeypatch.setenv("FSEARCH_FAULTS", "")
    r = invoke("run", "--task", "sudoku", "--steps", "4", "--model-preset", "tiny", "--out", str(tmp_path / "two"),
               "--worker-cmd", fake_worker_cmd + " --no-such-flag")
    assert r.exit_code == 1 and "failed (config)" in r.stderr
    assert_user_error(invoke("run", "--task", "sudoku", "--steps", "4", "--model-preset", "tiny", "--params", "[1]"),
                      "--params")
    assert_user_error(invoke("run", "--task", "nosuch", "--steps", "4", "--model-preset", "tiny"), "unknown task")
    assert_user_error(invoke("run", "--task", "sudoku", "--steps", "4", "--model-preset", "tiny", "--candidate",
                             "scalar_l1_wat"), "--candidate")
    assert_user_error(invoke("run", "--task", "sudoku", "--steps", "0", "--model-preset", "tiny"), "steps")
    assert_user_error(invoke("run", "--task", "sudoku", "--steps", "4"), "--model-preset or --checkpoint")


def test_report_command_uses_the_report_module(finished_round, monkeypatch):
    monkeypatch.setattr(cli_shared, "write_report", lambda rd, **kw: Path(rd) / "report" / "report.md")
    monkeypatch.setattr(cli_read, "check_report", lambda rd: ["value of x differs"])
    r = invoke("report", str(finished_round))
    assert r.exit_code == 0 and r.stdout.strip() == str(finished_round / "report" / "report.md")
    r = invoke("report", str(finished_round), "--check")
    assert r.exit_code == 1 and "problem: value of x differs" in r.stdout


def test_bench_passes_arguments_through(monkeypatch):
    seen = {}
    fake = types.ModuleType("fake_bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "fake_bench", fake)
    monkeypatch.setitem(cli_mod.BENCHES, "kernel", "fake_bench")
    r = invoke("bench", "kernel", "--T", "64", "--help")
    assert r.exit_code == 0 and seen["argv"] == ["--T", "64", "--help"]


def test_round_command_prints_the_summary_and_rejects_a_second_scheduler(write_spec, fake_env, tmp_path):
    from filelock import FileLock

    spec = write_spec()
    rd = tmp_path / "results" / "r"
    rd.mkdir(parents=True)
    with FileLock(str(rd / "round.lock")):
        assert_user_error(invoke("round", "--spec", str(spec)), "already being run by another scheduler")
    r = invoke("round", "--spec", str(spec), "--no-report")
    assert r.exit_code == 0, r.output
    assert "round r finished: 7 runs recorded" in r.stdout
    assert "[sud] sudoku, metric hole_acc, threshold +0.0000: done (finalists: scalar_l1_trainable)" in r.stdout


# ---------------------------------------------------------------------------------------------------------------------
# every error names its cause and its fix, before anything starts

def test_run_checks_every_flag_before_a_worker_starts_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    never = "false"  # a worker command that would fail if it were started
    base = ["run", "--task", "sudoku", "--steps", "4", "--worker-cmd", never]
    cases = [
        (["--steps", "-5", "--model-preset", "tiny"], "--steps: must be >= 1"),
        (["--model-preset", "tiny", "--batch", "0"], "--batch: must be >= 1"),
        (["--model-preset", "tiny", "--eval-every", "0"], "--eval-every"),
        (["--checkpoint", "notes.txt"], "--checkpoint: notes.txt"),
        (["--checkpoint", "missing.pth"], "--checkpoint: missing.pth not found"),
        (["--model-preset", "tiy"], "did you mean 'tiny'?"),
        (["--model-preset", "tiny", "--params", '{"bsae": 2}'], "--params: bsae"),
        (["--model-preset", "tiny", "--candidate", "scalar_l2_trainble"], "did you mean 'scalar_l2_trainable'?"),
        (["--model-preset", "tiny", "--candidate", "scalar_l9_trainable"], "--candidate scalar_l9_trainable"),
    ]
    for flags, needle in cases:
        assert_user_error(invoke(*base, *flags), needle)
    assert_user_error(invoke("run", "--task", "sudok", "--steps", "4", "--model-preset", "tiny"),
                      "did you mean 'sudoku'?")
    assert list(tmp_path.iterdir()) == [tmp_path / "notes.txt"]  # no results/adhoc folder


def test_report_status_export_before_the_first_record(tmp_path):
    round_dir = tmp_path / "results" / "r"
    round_dir.mkdir(parents=True)
    (round_dir / "spec.yaml").write_text("round: r\n")
    assert_user_error(invoke("report", str(round_dir)), "records.jsonl")
    for cmd in ("status", "export"):  # an empty table, an empty export
        r = invoke(cmd, str(round_dir))
        assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert_user_error(invoke("report", str(tmp_path / "nowhere")), "unknown round")


def test_every_spec_problem_is_listed_with_did_you_mean(tmp_path, tiny_spec):
    spec, _ = tiny_spec
    data = json.loads(json.dumps(spec))
    sud = data["tasks"]["sud"]
    sud["treshold"] = sud.pop("threshold")
    data["tasks"]["two"] = {"tsk": "sudoku", "batch": 4, "threshold": 0.0, "candidates": ["scalar_l1_trainable"]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    r = invoke("validate", "--spec", str(path), "--no-data")
    assert r.exit_code == 2 and "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "error: the spec has 2 problems:", lines
    assert lines[1].startswith("  tasks.sud.treshold: unknown key (did you mean 'threshold', a required key?)")
    assert lines[2].startswith("  tasks.two.tsk: unknown key (did you mean 'task', a required key?)")
