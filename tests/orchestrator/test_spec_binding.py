"""A round is bound to its spec: a spec that changes any run's conditions is refused on resume with one line naming
the change; edits that change no run (comments, layout, time limits, retries) resume; nothing in the round folder is
replaced; --new-version runs the changed spec as <round>.v2 beside the round; records of different conditions are
never pooled in the end-of-round summary. End to end with the fake worker (in-process CLI and scheduler)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.claim_strategy import (SpecChanged, condition_changes, spec_conditions, versioned_round,
                                         with_round_name)
from orchestrator.cli import cli
from orchestrator.progress import format_summary, mixed_conditions
from orchestrator.records import Ledger
from orchestrator.spec import load_spec, parse_spec_text


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def edit_steps(path: Path, steps: int) -> None:
    data = yaml.safe_load(path.read_text())
    data["stages"]["seedcheck"]["steps"] = steps
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_changed_spec_is_refused_unchanged_resumes_and_records_never_mix(write_spec, fake_env, tmp_path):
    spec = write_spec()
    round_dir = tmp_path / "results" / "r"
    r = invoke("round", "--spec", str(spec), "--no-report")
    assert r.exit_code == 0, r.output
    kept = (round_dir / "spec.yaml").read_text()
    records = Ledger(round_dir / "records.jsonl").read()
    assert len(records) == 7

    edit_steps(spec, 8)  # seedcheck was 6 steps
    err = one_error_line(invoke("round", "--spec", str(spec), "--no-report"))
    assert "stages.seedcheck.steps: 6 -> 8" in err and "--new-version" in err and "round:" in err
    assert (round_dir / "spec.yaml").read_text() == kept  # nothing replaced
    assert Ledger(round_dir / "records.jsonl").read() == records  # nothing run

    # comments, layout and supervision fields change no run: the round resumes (nothing left to run) and keeps its copy
    data = yaml.safe_load(kept)
    data["defaults"]["time_limit_s"] = 120
    data["defaults"]["retries"] = 5
    data["defaults"]["worker"] = "warm"  # how runs are executed, not what they are
    spec.write_text("# a comment\n" + yaml.safe_dump(data, sort_keys=True, default_flow_style=True))
    r = invoke("round", "--spec", str(spec), "--no-report")
    assert r.exit_code == 0, r.output
    assert (round_dir / "spec.yaml").read_text() == kept
    assert Ledger(round_dir / "records.jsonl").read() == records
    assert "WARNING" not in r.output

    # --new-version: the changed spec runs as r.v2 in its own folder; r is untouched
    edit_steps(spec, 8)
    r = invoke("round", "--spec", str(spec), "--no-report", "--new-version")
    assert r.exit_code == 0, r.output
    assert "running this one as round r.v2" in r.stderr
    v2 = tmp_path / "results" / "r.v2"
    v2_records = Ledger(v2 / "records.jsonl").read()
    assert {x.round for x in v2_records} == {"r.v2"}
    assert {x.budget_steps for x in v2_records if x.stage == "seedcheck"} == {8}
    assert load_spec(v2 / "spec.yaml").round == "r.v2"
    assert (round_dir / "spec.yaml").read_text() == kept
    assert Ledger(round_dir / "records.jsonl").read() == records
    assert "WARNING" not in r.output
    # running the same changed spec again with --new-version resumes r.v2 (nothing rerun), never an r.v3
    r = invoke("round", "--spec", str(spec), "--no-report", "--new-version")
    assert r.exit_code == 0, r.output
    assert Ledger(v2 / "records.jsonl").read() == v2_records and not (tmp_path / "results" / "r.v3").exists()
    # a third spec makes r.v3
    edit_steps(spec, 10)
    r = invoke("round", "--spec", str(spec), "--no-report", "--new-version")
    assert r.exit_code == 0, r.output
    assert {x.budget_steps for x in Ledger(tmp_path / "results" / "r.v3" / "records.jsonl").read()
            if x.stage == "seedcheck"} == {10}


def test_the_scheduler_refuses_a_changed_spec_under_its_lock(write_spec, fake_env, round_runner, tmp_path):
    """The strategy checks again when it opens the round (another process may have started it meanwhile)."""
    spec = write_spec()
    round_runner(spec)
    edit_steps(spec, 7)
    with pytest.raises(SpecChanged, match=r"stages\.seedcheck\.steps: 6 -> 7"):
        round_runner(spec)


def test_summary_never_pools_runs_of_different_conditions(make_record):
    recs = [make_record(0, stage="seedcheck", mode="baseline", candidate="baseline", seed=s, budget_steps=steps,
                        value=v, run_key=f"t.seedcheck.baseline.s{s}-{steps}")
            for steps, v in ((30, 0.30), (35, 0.40)) for s in (0, 1, 2)]
    text = format_summary(recs)
    assert text.startswith("WARNING: t seedcheck: records of 2 different conditions (30 steps: 3 runs, 35 steps: "
                           "3 runs)")
    assert "seedcheck (30 steps): baseline 0.3000 (mean of 3 seeds)" in text
    assert "seedcheck (35 steps): baseline 0.4000 (mean of 3 seeds)" in text
    assert "mean of 6" not in text
    assert mixed_conditions(recs[:3]) == [] and "WARNING" not in format_summary(recs[:3])


def test_conditions_compare_parsed_specs(tiny_spec):
    spec, _ = tiny_spec
    base = parse_spec_text(yaml.safe_dump(spec))
    flow = parse_spec_text("# same spec, other layout\n" + yaml.safe_dump(spec, default_flow_style=True))
    assert condition_changes(spec_conditions(base), spec_conditions(flow)) == []
    changed = dict(spec, tasks={"sud": {**spec["tasks"]["sud"], "threshold": 0.5}})
    assert condition_changes(spec_conditions(base), spec_conditions(parse_spec_text(yaml.safe_dump(changed)))) == \
        ["tasks.sud.threshold: 0.0 -> 0.5"]
    added = dict(spec, tasks={**spec["tasks"], "two": spec["tasks"]["sud"]})
    assert condition_changes(spec_conditions(base), spec_conditions(parse_spec_text(yaml.safe_dump(added))))[0] \
        .startswith("tasks.two: (absent) -> ")


def test_round_name_rewrite_keeps_comments(tiny_spec):
    spec, _ = tiny_spec
    text = "# head\n" + yaml.safe_dump(spec, sort_keys=False).replace("round: r", "round: 'r'  # the name")
    out = with_round_name(text, "r.v2")
    assert out.startswith("# head\n") and "round: r.v2  # the name" in out
    assert parse_spec_text(out).round == "r.v2"


def test_versioned_round_without_a_conflict_is_the_round_itself(write_spec):
    spec = load_spec(write_spec())
    assert versioned_round(spec).round == "r"


@pytest.mark.postgres
def test_shared_round_keeps_its_spec_in_the_study(pg_url, write_spec, fake_env, round_runner, tmp_path):
    from orchestrator.study import SPEC_ATTR, RoundStudy

    spec = write_spec({"storage": pg_url})
    _, records = round_runner(spec)
    stored = RoundStudy.load(pg_url, "r").study_attr(SPEC_ATTR)
    edit_steps(spec, 9)
    (tmp_path / "results" / "r" / "spec.yaml").unlink()  # another host: only the study knows the round's spec
    with pytest.raises(SpecChanged, match=r"stages\.seedcheck\.steps: 6 -> 9.*the study of round r"):
        round_runner(spec)
    err = one_error_line(invoke("round", "--spec", str(spec), "--no-report"))
    assert "stages.seedcheck.steps: 6 -> 9" in err
    assert RoundStudy.load(pg_url, "r").study_attr(SPEC_ATTR) == stored
    r = invoke("round", "--spec", str(spec), "--no-report", "--new-version")
    assert r.exit_code == 0, r.output
    assert RoundStudy.load(pg_url, "r.v2").study_attr(SPEC_ATTR).count("round: r.v2") == 1
    assert Ledger(tmp_path / "results" / "r" / "records.jsonl").read() == records
