"""The README's numbers that come from the rounds kept in results/examples/ say what those files say.

Each expected phrase is computed here from the records, the batch-probe files or the report's summary.json, rounded
as the README prints it, and must appear in the README's paragraph about that round. Memory is in GiB (2^30 bytes).
The synthetic table itself is checked in tests/orchestrator/test_examples.py.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "results" / "examples"
GIB = 2 ** 30


def readme_paragraph(start: str) -> str:
    """The README's paragraph that begins with `start`, its lines joined by spaces."""
    text = (ROOT / "README.md").read_text()
    i = text.index(start)
    end = text.find("\n\n", i)
    return " ".join(text[i:end if end >= 0 else None].split())


def records(round_name: str) -> list[dict]:
    lines = (EXAMPLES / round_name / "records.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def summary(round_name: str) -> dict:
    return json.loads((EXAMPLES / round_name / "report" / "summary.json").read_text())


def signed(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}".replace("-", "\u2212")


def delta(recs: list[dict], task: str, stage: str, candidate: str, seed: int = 0) -> float:
    (r,) = [r for r in recs if (r["task"], r["stage"], r["candidate"], r["seed"]) == (task, stage, candidate, seed)]
    return r["delta"]


def test_gpu_demo_warm_paragraph():
    """The round with the spec's current settings (warm worker, eager-graphs) against the earlier one."""
    name, earlier = "gpu_demo_h100_warm", "gpu_demo_h100"
    text = readme_paragraph("**GPU round**")
    recs, s, old = records(name), summary(name), records(earlier)
    bench = EXAMPLES / "bench_round_h100" / "gpu_demo_and_0.1b_warm.jsonl"
    rows = [json.loads(x) for x in bench.read_text().splitlines() if x.strip()]
    (row,) = [r for r in rows if r["spec"] == "studies/gpu_demo.yaml"]
    wall = row["round_wall_s"]
    assert row["runs"] == row["ok"] == len(recs)
    assert abs(row["run_wall_s_sum"] - sum(r["wall_s"] for r in recs)) < 0.1

    def median_wall(rs: list[dict], *stages: str) -> float:
        return statistics.median(r["wall_s"] for r in rs if r["stage"] in stages)

    def finalist(task: str, candidate: str) -> str:
        f = s["tasks"][task]["seedcheck"]["finalists"][candidate]
        return f"{signed(f['mean'])} [{signed(f['ci_low'])}, {signed(f['ci_high'])}], {f['wins']}/{f['n']} seeds, " \
               f"{f['decision']}"

    tok = statistics.median(r["tokens_per_s"] for r in recs)
    old_tok = statistics.median(r["tokens_per_s"] for r in old)
    assert f"{tok / 1000:.0f}k" == f"{row['tokens_per_s_median'] / 1000:.0f}k"
    expected = [
        f"took **{int(wall // 60)} min {wall % 60:.0f} s ({wall:.1f} s)**: {len(recs)} runs, all ok, "
        f"{row['run_wall_s_sum']:.1f} s of run time",
        f"Median run {median_wall(recs, 'quick'):.1f} s (quick, 100 steps), "
        f"{median_wall(recs, 'med'):.1f} s (med and seed check, 200 steps), against "
        f"{median_wall(old, 'quick'):.1f} s and {median_wall(old, 'seedcheck'):.0f}\u2013"
        f"{median_wall(old, 'med'):.0f} s in the earlier round",
        f"median training speed {tok / 1000:.0f}k tokens/s against {old_tok / 1000:.0f}k",
        f"That is {482 / wall:.2f}\u00d7 faster than the earlier round's 8 min 2 s while running "
        f"{len(recs) - len(old)} more runs",
        f"`rightcopy16`'s `scalar_l3_trainable` passed quick "
        f"({signed(delta(recs, 'rightcopy16', 'quick', 'scalar_l3_trainable'))}) and med "
        f"({signed(delta(recs, 'rightcopy16', 'med', 'scalar_l3_trainable'))}) into a 5-seed check "
        f"({finalist('rightcopy16', 'scalar_l3_trainable')})",
        f"`sudoku4`'s read-twice control went through quick ({signed(delta(recs, 'sudoku4', 'quick', 'read_twice'))}) "
        f"and med ({signed(delta(recs, 'sudoku4', 'med', 'read_twice'))}) to {finalist('sudoku4', 'read_twice')}",
    ]
    for phrase in expected:
        assert phrase in text, phrase
    assert len(old) == 23 and {r["status"] for r in recs} == {"ok"}
    assert {r["step_mode"] for r in recs} == {"eager-graphs"}


def test_gpu_demo_paragraph():
    name = "gpu_demo_h100"
    text = readme_paragraph("The earlier round (`results/examples/gpu_demo_h100/`")
    recs, s = records(name), summary(name)
    probes = {p.stem: json.loads(p.read_text()) for p in (EXAMPLES / name / "probe").glob("*.json")}
    assert set(probes) == {"sudoku4", "rightcopy16"}
    peaks = [r["peak_mem_bytes"] for r in recs]
    walls = [r["wall_s"] for r in recs]
    fin = s["tasks"]["sudoku4"]["seedcheck"]["finalists"]["read_twice"]
    expected = [
        f"({len(recs)} runs; {s['compute']['spent_wall_s']:.0f} s of run time; "
        f"pruning saved an estimated {s['compute']['saved_wall_s']:.0f} s)",
        f"picked micro-batch {probes['sudoku4']['micro_batch']} for both tasks",
        f"peak {probes['sudoku4']['peak_mem_bytes'] / GIB:.2f} GiB for sudoku4 and "
        f"{probes['rightcopy16']['peak_mem_bytes'] / GIB:.2f} GiB for rightcopy16 of "
        f"{probes['sudoku4']['device_mem_bytes'] / GIB:.0f} GiB",
        f"its peak memory ({min(peaks) / GIB:.2f} to {max(peaks) / GIB:.2f} GiB)",
        f"the read-twice control went through quick ({signed(delta(recs, 'sudoku4', 'quick', 'read_twice'))}) and "
        f"med ({signed(delta(recs, 'sudoku4', 'med', 'read_twice'))})",
        f"the 5-seed check gave {signed(fin['mean'])} [{signed(fin['ci_low'])}, {signed(fin['ci_high'])}], "
        f"{fin['wins']}/{fin['n']} seeds: {fin['decision']}",
        f"`scalar_l3_trainable` passed quick ({signed(delta(recs, 'sudoku4', 'quick', 'scalar_l3_trainable'))}) "
        f"and fell at med ({signed(delta(recs, 'sudoku4', 'med', 'scalar_l3_trainable'))})",
        f"On `rightcopy16` `scalar_l3_trainable` passed quick "
        f"({signed(delta(recs, 'rightcopy16', 'quick', 'scalar_l3_trainable'))}) and fell at med "
        f"({signed(delta(recs, 'rightcopy16', 'med', 'scalar_l3_trainable'))})",
        f"Runs took {min(walls):.0f}\u2013{max(walls):.0f} s each",
    ]
    for phrase in expected:
        assert phrase in text, phrase
    assert probes["sudoku4"]["micro_batch"] == probes["rightcopy16"]["micro_batch"]
    assert s["tasks"]["rightcopy16"]["seedcheck"]["finalists"] == {}  # "nothing reached the seed check"
    assert s["tasks"]["sudoku4"]["seedcheck"]["finalists"].keys() == {"read_twice"}
    assert not any(r["error_kind"] == "oom" or r["micro_batch"] != 128 for r in recs)  # "no run ran out of memory"


def test_gpu_demo_noise_paragraph():
    name = "gpu_demo_h100"
    text = readme_paragraph("The same spec ran earlier this day")
    noise = summary(name)["tasks"]["sudoku4"]["noise"]
    assert f"the paired deltas' SD at {noise['delta_sd']['read_twice']:.3f}" in text
    assert f"with probability about {100 * noise['null_pass_probability']:.0f}%" in text


def test_synthetic_table_paragraphs():
    name = "synthetic_table_h100"
    recs, s = records(name), summary(name)

    def mean_final(task: str, candidate: str) -> str:
        vals = [r["value"] for r in recs if (r["task"], r["candidate"]) == (task, candidate)]
        assert len(vals) == 5
        return f"{sum(vals) / len(vals):.3f}"

    after = readme_paragraph("Every row is **inconclusive**")
    assert (f"rightcopy FS {mean_final('rightcopy16', 'scalar_l1_nodetach')} vs read-twice "
            f"{mean_final('rightcopy16', 'read_twice')}; kvsort {mean_final('kvsort20', 'scalar_l1_nodetach')} vs "
            f"{mean_final('kvsort20', 'read_twice')}") in after
    walls = [r["wall_s"] for r in recs]
    assert (f"The round took {len(recs)} runs, {s['compute']['spent_wall_s']:.0f} s of run time "
            f"(median {statistics.median(walls):.1f} s a run)") in after
    assert {f["decision"] for t in s["tasks"].values() for f in t["seedcheck"]["finalists"].values()} == {
        "inconclusive"}

