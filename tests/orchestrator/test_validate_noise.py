"""`fsearch validate` with known noise: the spec's protocol simulated (real planner and decision rules) under the
paired-delta SDs a finished round measured, with a warning where a screen passes null candidates most of the time."""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from click.testing import CliRunner

from orchestrator.cli import cli
from orchestrator.simulate import NOISY_SCREEN_PASS, check_noise, search_spec, validate_noise
from orchestrator.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
GPU_DEMO = ROOT / "studies" / "gpu_demo.yaml"
GPU_DEMO_ROUND = ROOT / "results" / "examples" / "gpu_demo_h100"
SUDOKU4_PARAMS = {"base": 2, "mask_count": 8, "mask_region": "random"}  # gpu_demo's sudoku4


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def halving_spec(threshold: float = 0.005) -> dict:
    """8 FS candidates, halving over 2 -> 6 -> 12 quick seeds, a short sequential check; its one task is gpu_demo's
    sudoku4 under another label (matched by task and parameters)."""
    data = search_spec(8, looks=[4, 8], threshold=threshold)
    data["tasks"] = {"sudoku_b2": {**data["tasks"]["t"], "params": dict(SUDOKU4_PARAMS)}}
    return data


def test_one_seed_threshold_screens_warn_under_measured_noise():
    r = invoke("validate", "--spec", str(GPU_DEMO), "--no-data", "--noise-from", str(GPU_DEMO_ROUND))
    assert r.exit_code == 0, (r.output, r.exception)  # a warning is not an error
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    quick = [w for w in warnings if w.startswith("warning: sudoku4 quick screen")]
    assert len(quick) == 1 and "mostly noise" in quick[0] and "screen: halving" in quick[0], warnings
    assert any(w.startswith("warning: sudoku4: a real effect of +1 SD") for w in warnings), warnings
    lines = r.stdout.splitlines()
    sudoku = [line for line in lines if line.strip().startswith("sudoku4 (")]
    assert len(sudoku) == 1 and "family-wise" in sudoku[0] and "med runs" in sudoku[0]
    # rightcopy16 ran one seed per stage and no seed check there: its noise is unknown, so nothing is said of it
    assert any("rightcopy16: no noise measured" in line for line in lines)
    assert not any("rightcopy16" in w for w in warnings)


def test_rates_follow_the_rule_and_the_noise():
    spec = load_spec(GPU_DEMO)
    noisy = check_noise(spec, GPU_DEMO_ROUND, replicates=100)
    (task,) = noisy.tasks
    # one seed, threshold 0.005 against a paired-delta SD of 0.067: about a coin flip
    assert 0.35 < task.screen_pass_null["quick"].value < 0.65
    data = yaml.safe_load(GPU_DEMO.read_text())
    for t in data["tasks"].values():
        t["threshold"] = 0.15  # about 2.2 SD: a null candidate rarely reaches it on one seed
    strict = check_noise(parse_spec(data), GPU_DEMO_ROUND, replicates=100)
    assert strict.tasks[0].screen_pass_null["quick"].value < 0.1
    assert not [w for w in strict.warnings() if "quick screen" in w]


def test_halving_screens_do_not_warn_and_tasks_match_by_kind_and_params():
    check = check_noise(parse_spec(halving_spec()), GPU_DEMO_ROUND, replicates=60)
    (task,) = check.tasks
    assert task.task == "sudoku_b2" and "sudoku4" in task.matched
    assert task.sd["quick"] == task.sd["seedcheck"]  # one-seed stages there: the seed check's SD, as measured
    # 8 -> 4 -> 2 -> 1 by rank with every candidate null (fewer where the drop rule removes some)
    assert task.screen_pass_null["quick"].value <= 1 / 8 + 1e-9
    assert not [w for w in check.warnings() if "screen" in w]
    assert NOISY_SCREEN_PASS > 1 / 8


def test_resumed_round_of_the_original_layout_is_its_own_noise_source(tmp_path):
    data = yaml.safe_load(GPU_DEMO.read_text())
    data["output"] = str(tmp_path)
    spec_file = tmp_path / "gpu_demo.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    r = invoke("validate", "--spec", str(spec_file), "--no-data")
    assert r.exit_code == 0 and "error rates" not in r.stdout and "mostly noise" not in r.stderr  # no records yet
    round_dir = tmp_path / "gpu_demo"
    round_dir.mkdir()
    for name in ("records.jsonl", "spec.yaml"):
        shutil.copy(GPU_DEMO_ROUND / name, round_dir / name)
    r = invoke("validate", "--spec", str(spec_file), "--no-data")
    assert r.exit_code == 0, (r.output, r.exception)
    assert f"noise measured in {round_dir}" in r.stdout
    assert "warning: sudoku4 quick screen" in r.stderr


def test_multi_seed_screens_use_no_implicit_noise(tmp_path):
    data = halving_spec()
    data["output"] = str(tmp_path)
    round_dir = tmp_path / data["round"]
    round_dir.mkdir()
    shutil.copy(GPU_DEMO_ROUND / "records.jsonl", round_dir / "records.jsonl")
    assert validate_noise(parse_spec(data), None) == ([], [])


def test_noise_from_a_folder_without_records_is_one_line_error(tmp_path):
    r = invoke("validate", "--spec", str(GPU_DEMO), "--no-data", "--noise-from", str(tmp_path))
    assert r.exit_code == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: --noise-from")
