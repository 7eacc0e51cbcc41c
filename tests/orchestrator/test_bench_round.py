"""`fsearch bench round`: a spec's round under several settings, each in its own folder, with the round times, the
runs' start-up and throughput, and whether decisions and records agree with the first variant (fake worker)."""
from __future__ import annotations

import json

from orchestrator.bench_round import compare, parse_variant
from orchestrator.records import Ledger


def test_variants_run_as_rounds_of_their_own_and_are_compared_with_the_first(write_spec, fsearch_cli, tmp_path):
    spec = write_spec()
    out, rows_file = tmp_path / "bench", tmp_path / "rows.jsonl"
    p = fsearch_cli("bench", "round", "--spec", str(spec), "--variant", "worker=fresh", "--variant", "worker=warm",
                    "--variant", "compile=on,time_limit_s=50", "--out", str(out), "--json", str(rows_file),
                    env={"FAKE_WORKER_STEP_S": "0.05"})
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["fresh", "warm", "on_50"]
    assert rows[1]["settings"] == {"worker": "warm"} and rows[2]["settings"] == {"compile": "on", "time_limit_s": 50}
    for r in rows:  # 7 runs: quick baseline + 2 candidates; seedcheck 2 seeds x (baseline + 1 finalist)
        assert r["exit"] == 0 and r["runs"] == r["ok"] == 7 and r["failed"] == 0 and r["round_wall_s"] > 0
    # the worker setting does not change a run: same runs, same records; the step mode is part of a run's identity
    assert rows[1]["same_decisions"] and rows[1]["same_runs"] and rows[1]["same_records"]
    assert rows[2]["same_decisions"] and not rows[2]["same_runs"] and not rows[2]["same_records"]
    # each variant is a round of its own with the spec's settings changed
    for label, compile_ in (("fresh", None), ("warm", None), ("on_50", "on")):
        records = Ledger(out / f"r-{label}" / "records.jsonl").read()
        assert len(records) == 7 and {r.round for r in records} == {f"r-{label}"}
        assert (out / f"{label}.log").exists()
    assert "worker: warm" in (out / "warm.yaml").read_text()
    table = p.stdout.splitlines()
    assert any(line.split()[:2] == ["warm", "0"] and "equal" in line for line in table), p.stdout
    assert any(line.startswith("on_50") and "other runs" in line for line in table), p.stdout
    # the same folder again: refused before anything runs
    again = fsearch_cli("bench", "round", "--spec", str(spec), "--variant", "worker=fresh", "--out", str(out))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "has records already" in again.stderr


def test_bad_variants_are_one_line_and_run_nothing(write_spec, fsearch_cli, tmp_path):
    spec = write_spec()
    for variant, message in (("worker", "expected key=value"), ("worker=lukewarm", "defaults.worker"),
                             ("nonsense_key=1", "defaults.nonsense_key: unknown key")):
        p = fsearch_cli("bench", "round", "--spec", str(spec), "--variant", "worker=fresh", "--variant", variant,
                        "--out", str(tmp_path / "b"))
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
        assert not (tmp_path / "b").exists()
    p = fsearch_cli("bench", "round", "--spec", str(spec), "--variant", "worker=warm", "--variant", "worker=warm")
    assert p.returncode == 2 and "two variants are the same" in p.stderr


def test_parse_variant_and_a_decision_that_differs(make_record):
    assert parse_variant("worker=warm, compile=off,time_limit_s=90") == {"worker": "warm", "compile": "off",
                                                                         "time_limit_s": 90}
    a = [make_record(run_key="k1", candidate="c1", decision="promote"), make_record(run_key="k0")]
    b = [make_record(run_key="k1", candidate="c1", decision="prune"), make_record(run_key="k0")]
    got = compare(a, b)
    assert not got["same_decisions"] and got["same_runs"] and not got["same_records"]
    assert len(got["decisions_differ"]) == 1 and ".c1." in got["decisions_differ"][0]
    assert compare(a, list(a))["same_records"]
