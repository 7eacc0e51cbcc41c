"""Random invocations of every subcommand (a seeded generator: random flags, values, missing and repeated options)
never end in a traceback: exit code 0, 1 or 2, and no "Traceback" in the output. In-process (CliRunner), bounded in
count and time. Worker commands are replaced by `false`, so nothing trains; fetch never reaches the network (names
are not in the manifest), the benchmarks (torch-side) are left out."""
from __future__ import annotations

import random
import time

import pytest
from click.testing import CliRunner

from orchestrator.cli import cli

VALUES = ["", "0", "-5", "1", "3.5", "nan", "inf", "-1e309", "x", "{}", "[1]", '{"base": 2}', '{"base": "a"}', "tiny",
          "sudoku", "scalar_l1_trainable", "scalar_l9_trainable", "read_twice", "baseline", "nosuch", "demo",
          "studies/demo.yaml", "/dev/null", "/", "results", "sqlite:///x.db", "postgresql://u@127.0.0.1:1/db", "csv",
          "parquet", "jsonl", "cpu", "cuda", "auto", "bf16", "0,1", "a,b", "\u00e9\u00e8", "1" * 40]
COMMANDS = {
    "round": ["--spec", "--storage", "--workers", "--gpu", "--no-report", "--new-version", "--heartbeat-s",
              "--stale-after-s"],
    "worker": ["--round", "--storage", "--spec", "--results", "--gpu", "--heartbeat-s", "--stale-after-s", "--wait-s"],
    "status": ["ROUND", "--results", "--storage"],
    "export": ["ROUND", "--format", "-o", "--results", "--storage"],
    "validate": ["--spec", "--no-data"],
    "run": ["--task", "--params", "--candidate", "--fs", "--steps", "--eval-every", "--seed", "--batch", "--micro-batch",
            "--lr", "--model-preset", "--checkpoint", "--n-val", "--n-test", "--data-seed", "--device", "--kernel",
            "--precision", "--compile", "--time-limit", "--out"],
    "report": ["ROUND", "--check", "--results", "--storage"],
    "simulate": ["--spec", "--effects", "--candidates", "--threshold", "--replicates", "--seed", "--json"],
    "list": ["tasks", "candidates", "presets", "sudoku", "--params"],
    "fetch": ["list", "checkpoint", "data", "nosuch-model", "--cache", "--from"],
}
FLAGS_WITHOUT_VALUE = {"--no-report", "--new-version", "--no-data", "--check", "--json"}
N_INVOCATIONS = 150
TIME_BUDGET_S = 25.0


def random_argv(rng: random.Random, tmp: str) -> list[str]:
    command = rng.choice(list(COMMANDS))
    argv = [command]
    for _ in range(rng.randint(0, 6)):
        word = rng.choice(COMMANDS[command] + ["--no-such-flag", "-h"] if rng.random() < 0.1 else COMMANDS[command])
        if word == "ROUND":
            argv.append(rng.choice([tmp, f"{tmp}/nowhere", "r", "demo"]))
        elif word.startswith("-") and word not in FLAGS_WITHOUT_VALUE and word != "-h":
            argv += [word] if rng.random() < 0.05 else [word, rng.choice(VALUES)]  # sometimes the value is missing
        else:
            argv.append(word)
    if command == "simulate":
        argv += ["--replicates", "20"]  # a valid invocation stays fast
    if command in ("round", "worker", "run"):
        argv += ["--worker-cmd", "false"]
    return argv


@pytest.mark.timeout(120)
def test_random_invocations_never_end_in_a_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FSEARCH_RESULTS", str(tmp_path / "results"))
    rng = random.Random(19)
    runner = CliRunner()
    start, ran = time.monotonic(), 0
    while ran < N_INVOCATIONS and time.monotonic() - start < TIME_BUDGET_S:
        argv = random_argv(rng, str(tmp_path))
        result = runner.invoke(cli, argv)
        ran += 1
        assert result.exit_code in (0, 1, 2), (argv, result.exit_code, result.output, result.exception)
        assert "Traceback" not in result.output, (argv, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (argv, repr(result.exception))
    assert ran >= 30  # the budget allowed a meaningful number of invocations
