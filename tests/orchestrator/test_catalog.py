"""`fsearch list`, the declared metric definitions and chance levels (the API decisions read), and the help that
works everywhere (`--version`, bare `fsearch`, `bench --help`)."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest
from click.testing import CliRunner

from orchestrator.catalog import format_candidates, format_list, format_presets, task_entry
from tasks import task_class, task_names
from tasks.base import TaskError


@pytest.mark.parametrize("name", task_names())
def test_every_metric_a_task_reports_is_defined(name):
    cls = task_class(name)
    metrics = cls.metrics()
    assert set(cls.unit_metrics) <= set(metrics)
    assert {"loss", "tok_acc", "exact", cls.primary_metric} <= set(metrics)
    assert all(d and "\n" not in d for d in metrics.values())


def test_chance_levels_are_exact_where_declared():
    sudoku = task_class("sudoku")
    assert sudoku.chance_level({"base": 2}) == 1 / 4
    assert sudoku.chance_level({"base": 3}) == 1 / 9
    assert sudoku.chance_level({"base": 3}, "cell_acc") is None  # not declared: givens make it params-dependent
    assert task_class("kvsort_order").chance_level({"n": 5}) == 1 / 5
    assert task_class("kvsort_order").chance_level({"n": 5}, "exact") == 1 / 120
    assert task_class("kv_retrieval").chance_level({"vlen": 3}, "exact") == pytest.approx(1e-3)
    assert task_class("protein_contact_pair").chance_level(None, "pair_acc") == 0.5
    for name in ("arc", "hotpot", "mbpp", "punc_restore", "protein_ss_spot", "protein_contact_pair"):
        assert task_class(name).chance_level() is None  # primary tok_acc depends on the tokenizer
    with pytest.raises(TaskError, match="params.base"):
        sudoku.chance_level({"base": 5})


def test_chance_level_needs_no_torch():
    code = ("import sys; from tasks import task_class; "
            "assert task_class('sudoku').chance_level({'base': 3}) == 1/9; "
            "from orchestrator.catalog import format_list; format_list('tasks'); format_list('candidates'); "
            "format_list('presets'); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_list_tasks_shows_params_metrics_and_chance():
    text = format_list("tasks", ["sudoku"])
    assert text.startswith("sudoku: sudoku completion")
    assert "    base: 2|3 = 2" in text and "    mask_count: int|null = null" in text
    assert "*hole_acc" in text and "[chance 0.25]" in text
    assert "chance 0.1111" in format_list("tasks", ["sudoku"], {"base": 3})
    entry = task_entry("arc")
    assert entry["primary_metric"] == "tok_acc" and entry["chance"] == {}
    assert any(line.startswith("dataset: str = ai2_arc") for line in entry["params"])
    assert set(format_list("tasks").split("\n\n")[0].splitlines()[0].split(":")[:1]) <= set(task_names())


def test_list_candidates_and_presets():
    cands = format_candidates()
    assert "scalar_lN_trainable" in cands and "alpha_lr=0.0005" in cands and "read_twice" in cands
    presets = format_presets()
    assert "tiny" in presets and "12 layers x 768" in presets


def invoke(args):
    from orchestrator.cli import cli

    return CliRunner().invoke(cli, args, prog_name="fsearch")


def test_cli_list_and_errors():
    res = invoke(["list", "tasks", "kvsort_order", "--params", '{"n": 4}'])
    assert res.exit_code == 0 and "[chance 0.25]" in res.output
    res = invoke(["list", "tasks", "sudok"])
    assert res.exit_code == 2 and res.output.startswith("error: unknown task 'sudok'")
    res = invoke(["list", "presets", "tiny"])
    assert res.exit_code == 2 and "takes no names" in res.output
    res = invoke(["list", "tasks", "--params", "[1]"])
    assert res.exit_code == 2 and "JSON object" in res.output


def test_version_bare_and_bench_help():
    res = invoke(["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"fsearch {version('fsearch')}"
    res = invoke([])
    assert res.exit_code == 0 and res.output.startswith("Usage: fsearch") and "error:" not in res.output
    assert "\n  list " in res.output and "\n  fetch " in res.output
    res = invoke(["bench", "--help"])
    assert res.exit_code == 0 and res.output.startswith("Usage: fsearch bench")
    res = invoke(["bench", "nope"])
    assert res.exit_code == 2 and "unknown benchmark 'nope'" in res.output


def test_bench_model_help_names_its_command():
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "bench", "model", "--help"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("usage: fsearch bench model")
