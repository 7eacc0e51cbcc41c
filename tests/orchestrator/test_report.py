"""The round report from a synthetic round folder: expected numbers, plots, the integrity check and tampering."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import scipy.stats as ss

from orchestrator.planner import judge, plan
from orchestrator.records import Ledger, Record
from orchestrator.report import build_summary, check_report, load_round, write_report
from orchestrator.spec import parse_spec_text
from tasks import task_class

SEEDS = [0, 1, 2, 3, 4]
SPEC = """\
round: synth
model: {preset: tiny}
output: results
defaults: {device: cpu}
stages:
  quick:     {steps: 40, eval_every: 20, seeds: [0]}
  med:       {steps: 80, eval_every: 40, seeds: [0]}
  seedcheck: {steps: 80, eval_every: 40, seeds: [0, 1, 2, 3, 4], max_finalists: 2}
tasks:
  sudoku4:
    task: sudoku
    params: {base: 2, mask_count: 6, mask_region: random}
    batch: 16
    threshold: 0.01
    candidates: [scalar_l2_trainable, scalar_l1_sched_cos, head_l2, read_twice]
  kv_last:
    task: kv_retrieval
    params: {layout: question_last, k: 8, vlen: 4}
    batch: 8
    threshold: 0.0
    candidates: [scalar_l2_trainable, scalar_l1_sched_cos, read_twice]
"""
# the seed check's paired deltas, by (task, candidate)
SEEDCHECK_DELTAS = {
    ("sudoku4", "scalar_l2_trainable"): [0.03, 0.05, 0.04, 0.06, 0.045],  # clearly better on every seed
    ("sudoku4", "scalar_l1_sched_cos"): [0.02, -0.01, 0.015, 0.005, -0.005],  # noise
    ("kv_last", "scalar_l2_trainable"): [-0.05, -0.04, -0.0625, -0.03, -0.045],  # clearly worse
    ("kv_last", "scalar_l1_sched_cos"): [0.0625, 0.0125, -0.025, 0.05, 0.0375],  # positive-ish, one negative
}
BASE_SEEDCHECK = [0.61, 0.58, 0.64, 0.6, 0.625]
# one-seed screening stages: final values (None: the run failed)
SCREEN = {
    "sudoku4": {"quick": {"baseline": 0.5, "scalar_l2_trainable": 0.56, "scalar_l1_sched_cos": 0.53, "head_l2": 0.505,
                          "read_twice": None},
                "med": {"baseline": 0.6, "scalar_l2_trainable": 0.66, "scalar_l1_sched_cos": 0.62}},
    "kv_last": {"quick": {"baseline": 0.38, "scalar_l2_trainable": 0.41, "scalar_l1_sched_cos": 0.40,
                          "read_twice": 0.35},
                "med": {"baseline": 0.5, "scalar_l2_trainable": 0.52, "scalar_l1_sched_cos": 0.505}},
}
METRIC = {"sudoku4": task_class("sudoku").primary_metric, "kv_last": task_class("kv_retrieval").primary_metric}


def value_of(task: str, stage: str, cand: str, seed: int) -> float | None:
    if stage == "seedcheck":
        base = BASE_SEEDCHECK[seed]
        return base if cand == "baseline" else base + SEEDCHECK_DELTAS[(task, cand)][seed]
    return SCREEN[task][stage][cand]


class RoundBuilder:
    """A round folder written the way the scheduler writes one: the planner picks the runs, `judge` fills each
    record's comparison fields; the 'training' is a table of final values with linear validation curves."""

    def __init__(self, root: Path, spec_text: str = SPEC):
        self.spec = parse_spec_text(spec_text)
        self.dir = root / self.spec.round
        self.dir.mkdir(parents=True)
        (self.dir / "spec.yaml").write_text(spec_text)
        self.ledger = Ledger(self.dir / "records.jsonl")
        self.records: list[Record] = []

    def run_all(self, values=None) -> None:
        values = values or value_of
        while True:
            units = plan(self.spec, self.records).runnable
            if not units:
                return
            for unit in units:
                self.add(unit, values(unit.task, unit.stage, unit.candidate.name, unit.seed))

    def add(self, unit, value: float | None) -> Record:
        status = "ok" if value is not None else "failed"
        run_dir = self.dir / "runs" / unit.run_key / "attempt-0"
        run_dir.mkdir(parents=True)
        metric = unit.metric_name(METRIC[unit.task])
        final, best = {}, {}
        if status == "ok":
            loss = 2.0 - value  # a loss that falls as the metric rises
            final = {"val_loss": loss, f"val_{metric}": value, "val_tok_acc": value}
            best = dict(final)
            rows = []
            for step in range(0, unit.steps + 1, unit.eval_every):
                frac = step / unit.steps
                rows.append({"step": step, "tokens": step * 1000, "train_loss": 3.0 - frac,
                             "val_loss": 3.0 - frac * (3.0 - loss), f"val_{metric}": 0.3 + frac * (value - 0.3),
                             "val_tok_acc": 0.3 + frac * (value - 0.3)})
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        j = judge(unit, status, value, self.records)
        cand = unit.candidate
        rec = Record(
            round=self.spec.round, task=unit.task, task_kind=unit.task_kind, stage=unit.stage, candidate=cand.name,
            mode=cand.mode, seed=unit.seed, run_key=unit.run_key, attempt=0,
            fs=cand.fs.model_dump(mode="json") if cand.fs else None, batch_size=unit.batch_size,
            micro_batch=unit.batch_size, grad_accum=1, steps=unit.steps if status == "ok" else unit.steps // 2,
            budget_steps=unit.steps, eval_every=unit.eval_every, n_val=unit.n_val, data_seed=unit.data_seed,
            status=status, error_kind=None if status == "ok" else "crash",
            error_message=None if status == "ok" else "worker crashed", metric=metric, value=value, final=final,
            best=best, best_step=unit.steps if best else None, baseline_key=j.baseline_key,
            baseline_value=j.baseline_value, delta=j.delta, threshold=j.threshold, decision=j.decision,
            wall_s=round(unit.steps * 0.1 + 0.01 * unit.seed + 0.003 * len(cand.name), 6), run_dir=str(run_dir),
            finished_at="2026-01-01T00:00:00+00:00", best_val_loss=best.get("val_loss"),
            best_val_tok_acc=best.get("val_tok_acc"))
        self.ledger.append(rec)
        self.records.append(rec)
        return rec


def build_round(root: Path) -> RoundBuilder:
    rb = RoundBuilder(root)
    rb.run_all()
    return rb


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """One synthetic round with its report written (shared, read-only); tests that modify it copy it first."""
    rb = build_round(tmp_path_factory.mktemp("round"))
    path = write_report(rb.dir)
    return rb, path


def copy_round(rb: RoundBuilder, tmp_path: Path) -> Path:
    """A copy of the round folder whose records point at the copy's run folders."""
    dst = tmp_path / "synth"
    shutil.copytree(rb.dir, dst)
    text = (dst / "records.jsonl").read_text().replace(str(rb.dir), str(dst))
    (dst / "records.jsonl").write_text(text)
    write_report(dst)
    return dst


def summary_of(round_dir: Path) -> dict:
    return json.loads((round_dir / "report" / "summary.json").read_text())


# --- the numbers ---------------------------------------------------------------------------------------------------
def test_seedcheck_numbers_and_decisions(reported):
    rb, _ = reported
    s = summary_of(rb.dir)
    assert s["rule"]["family_size"] == 4
    raw_p = {}
    for (task, cand), deltas in SEEDCHECK_DELTAS.items():
        f = s["tasks"][task]["seedcheck"]["finalists"][cand]
        d = [BASE_SEEDCHECK[i] + deltas[i] - BASE_SEEDCHECK[i] for i in SEEDS]  # what the records hold
        ref = ss.ttest_1samp(d, 0.0)
        ci = ref.confidence_interval(0.95)
        assert f["n"] == 5 and list(f["deltas"].values()) == d
        assert f["mean"] == pytest.approx(np.mean(d), rel=1e-12)
        assert f["ci_low"] == pytest.approx(ci.low, rel=1e-9) and f["ci_high"] == pytest.approx(ci.high, rel=1e-9)
        assert f["p_t_two_sided"] == pytest.approx(ref.pvalue, rel=1e-8)
        assert f["p_wilcoxon_greater"] == pytest.approx(ss.wilcoxon(d, alternative="greater").pvalue, rel=1e-12)
        raw_p[(task, cand)] = ref.pvalue
    # Holm over the 4 finalists, by hand
    order = sorted(raw_p, key=raw_p.get)
    running = 0.0
    for rank, k in enumerate(order):
        running = max(running, min(1.0, (4 - rank) * raw_p[k]))
        assert s["tasks"][k[0]]["seedcheck"]["finalists"][k[1]]["p_t_holm"] == pytest.approx(running, rel=1e-8)
    dec = {k: s["tasks"][k[0]]["seedcheck"]["finalists"][k[1]]["decision"] for k in SEEDCHECK_DELTAS}
    assert dec == {("sudoku4", "scalar_l2_trainable"): "confirmed", ("sudoku4", "scalar_l1_sched_cos"): "inconclusive",
                   ("kv_last", "scalar_l2_trainable"): "rejected", ("kv_last", "scalar_l1_sched_cos"): "inconclusive"}
    assert s["decisions"]["confirmed"] == ["sudoku4/scalar_l2_trainable"]
    # one negative seed of kv_last/scalar_l1_sched_cos: patterns with sum >= observed are the observed one, -0.025
    # flipped, and both -0.025 and 0.0125 flipped: p = 3/32, so the sign-flip veto keeps it inconclusive
    f = s["tasks"]["kv_last"]["seedcheck"]["finalists"]["scalar_l1_sched_cos"]
    assert f["p_sign_flip_greater"] == 3 / 32 and "sign-flip" in f["reason"]


def test_stage_tables_and_compute(reported):
    rb, _ = reported
    s = summary_of(rb.dir)
    t = s["tasks"]["sudoku4"]
    q = t["stages"]["quick"]["candidates"]
    assert q["scalar_l2_trainable"]["mean_delta"] == pytest.approx(0.06) and q["head_l2"]["stage_decision"] == "prune"
    assert q["read_twice"]["stage_decision"] == "prune" and q["read_twice"]["seeds"]["s0"]["status"] == "failed"
    assert t["failed_runs"][0]["candidate"] == "read_twice"
    walls = {}
    for r in rb.records:
        if r.task == "sudoku4":
            walls.setdefault(r.stage, []).append(r.wall_s)
    comp = t["compute"]
    for stage, full_runs in (("quick", 5), ("med", 5), ("seedcheck", 25)):
        c = comp["stages"][stage]
        assert c["runs"] == len(walls[stage]) and c["wall_s"] == pytest.approx(sum(walls[stage]))
        assert c["full_runs"] == full_runs
        assert c["full_wall_s"] == pytest.approx(sum(walls[stage]) / len(walls[stage]) * full_runs)
    spent = sum(sum(v) for v in walls.values())
    assert comp["spent_wall_s"] == pytest.approx(spent)
    full = sum(comp["stages"][st]["full_wall_s"] for st in ("quick", "med", "seedcheck"))
    assert comp["saved_wall_s"] == pytest.approx(full - spent) and comp["saved_wall_s"] > 0
    assert s["compute"]["spent_wall_s"] == pytest.approx(sum(r.wall_s for r in rb.records))


def test_report_files(reported):
    rb, path = reported
    md = path.read_text()
    out = rb.dir / "report"
    # the rule is written in the report; the seed-check table shows the interval computed by scipy
    assert "## Decision rule (seed check)" in md and "Holm" in md and "sign-flip" in md
    d = SEEDCHECK_DELTAS[("sudoku4", "scalar_l2_trainable")]
    d = [BASE_SEEDCHECK[i] + d[i] - BASE_SEEDCHECK[i] for i in SEEDS]
    ci = ss.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert f"[{ci.low:+.4f}, {ci.high:+.4f}]" in md
    assert "**confirmed**" in md and "**rejected**" in md
    assert "Pruned: head_l2, read_twice." in md
    for task in ("sudoku4", "kv_last"):
        for kind in ("deltas", "curves"):
            png = out / f"{kind}_{task}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
            assert f"]({kind}_{task}.png)" in md
    # the original's formats: the round format and the paired format the original aggregator parsed
    txt = (out / "summary.txt").read_text()
    assert "[sudoku4]" in txt and "  baseline quick: acc=50.00% loss=1.5000 bsz=16" in txt
    assert re.search(r"    scalar_l2_trainable\s+d_acc=\+6\.00pp acc=56\.00% \[KEEP\]", txt)
    assert "    seed=0: baseline=61.00% fs=64.00% d_acc=+3.00pp" in txt
    assert "mean d_acc=+4.50pp, positive_seeds=5/5" in txt
    m = re.search(r"pairs=(\d+) mean d_acc=([-+.\d]+) sd\(n-1\)=([.\d]+).*sign\(\+/0/-\)=(\d+)/(\d+)/(\d+)", txt)
    assert m and m.group(1) == "5" and float(m.group(2)) == pytest.approx(np.mean(d), abs=1e-4)
    assert float(m.group(3)) == pytest.approx(np.std(d, ddof=1), abs=1e-4)  # the sample SD, as in report.md


def test_check_passes_on_a_fresh_report(reported):
    rb, _ = reported
    assert check_report(rb.dir) == []


# --- tampering -----------------------------------------------------------------------------------------------------
def edit_records(round_dir: Path, edit) -> None:
    path = round_dir / "records.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines = edit(lines)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def key_of(round_dir: Path, task: str, stage: str, cand: str, seed: int) -> str:
    return next(r.run_key for r in Ledger(round_dir / "records.jsonl").read()
                if (r.task, r.stage, r.candidate, r.seed) == (task, stage, cand, seed))


def test_tampered_value_is_named(reported, tmp_path):
    rb, _ = reported
    rd = copy_round(rb, tmp_path)
    assert check_report(rd) == []
    key = key_of(rd, "sudoku4", "seedcheck", "scalar_l1_sched_cos", 3)

    def bump(lines):
        for x in lines:
            if x["run_key"] == key:
                x["value"] += 0.05
        return lines

    edit_records(rd, bump)
    msgs = check_report(rd)
    assert msgs
    path = "tasks.sudoku4.seedcheck.finalists.scalar_l1_sched_cos"
    assert any(m.startswith(f"{path}.mean:") and key in m for m in msgs), msgs
    assert any(m.startswith(f"{path}.deltas.s3:") and key in m for m in msgs), msgs
    assert any(m.startswith(f"record {key}: value is 0.605") for m in msgs), msgs
    # the record also contradicts itself now (its value is no longer its final eval, its delta no longer value - base)
    assert any(m.startswith(f"integrity: record {key}: delta") for m in msgs), msgs


def test_deleted_record_is_named(reported, tmp_path):
    rb, _ = reported
    rd = copy_round(rb, tmp_path)
    key = key_of(rd, "kv_last", "seedcheck", "scalar_l2_trainable", 2)
    edit_records(rd, lambda lines: [x for x in lines if x["run_key"] != key])
    msgs = check_report(rd)
    assert f"missing record {key}: cited by the report, not in records.jsonl" in msgs
    assert any(m.startswith("tasks.kv_last.seedcheck.finalists.scalar_l2_trainable.n: report says 5, records give 4")
               and key in m for m in msgs), msgs
    # a deleted baseline: every candidate that cites it now has a missing matched baseline
    base = key_of(rd, "sudoku4", "med", "baseline", 0)
    edit_records(rd, lambda lines: [x for x in lines if x["run_key"] != base])
    msgs = check_report(rd)
    assert any(m.startswith(f"integrity: missing record {base}: the matched baseline of") for m in msgs), msgs


def test_hand_edited_report_is_caught(reported, tmp_path):
    rb, _ = reported
    rd = copy_round(rb, tmp_path)
    md = rd / "report" / "report.md"
    md.write_text(md.read_text().replace("**rejected**", "**confirmed**", 1))
    msgs = check_report(rd)
    assert msgs and msgs[0].startswith("report.md: 1 line(s) differ") and "rejected" in msgs[1]
    summary = rd / "report" / "summary.json"
    data = json.loads(summary.read_text())
    data["tasks"]["sudoku4"]["compute"]["saved_wall_s"] += 1.0
    summary.write_text(json.dumps(data))
    assert any(m.startswith("tasks.sudoku4.compute.saved_wall_s: report says") for m in check_report(rd))


def test_inconsistent_records_are_reported(tmp_path):
    rb = build_round(tmp_path)
    key = key_of(rb.dir, "sudoku4", "quick", "head_l2", 0)

    def wrong_decision(lines):
        for x in lines:
            if x["run_key"] == key:
                x["decision"] = "promote"  # delta 0.005 < threshold 0.01
        return lines

    edit_records(rb.dir, wrong_decision)
    path = write_report(rb.dir)
    assert "## Integrity problems" in path.read_text()
    msgs = check_report(rb.dir)
    assert any(m.startswith(f"integrity: record {key}: decision 'promote'") for m in msgs), msgs


def test_unmatched_baseline_is_a_problem(tmp_path):
    rb = build_round(tmp_path)
    key = key_of(rb.dir, "sudoku4", "med", "scalar_l2_trainable", 0)
    quick_base = key_of(rb.dir, "sudoku4", "quick", "baseline", 0)

    def point_at_quick(lines):  # the original's flaw: a med candidate compared with the quick baseline
        for x in lines:
            if x["run_key"] == key:
                x["baseline_key"] = quick_base
        return lines

    edit_records(rb.dir, point_at_quick)
    s = build_summary(load_round(rb.dir))
    msgs = [p["message"] for p in s["problems"]]
    assert any(f"record {key}: its baseline {quick_base} differs in stage" in m for m in msgs), msgs


def test_round_without_spec_and_in_progress(tmp_path):
    rb = build_round(tmp_path)
    (rb.dir / "spec.yaml").unlink()
    key = key_of(rb.dir, "kv_last", "seedcheck", "scalar_l1_sched_cos", 4)
    edit_records(rb.dir, lambda lines: [x for x in lines if x["run_key"] != key])  # the run has not finished yet
    write_report(rb.dir)
    s = summary_of(rb.dir)
    f = s["tasks"]["kv_last"]["seedcheck"]["finalists"]["scalar_l1_sched_cos"]
    assert f["n"] == 4 and f["excluded"] == [{"seed": 4, "reason": "no record"}]
    assert f["decision"] == "inconclusive"
    assert check_report(rb.dir) == []
    assert math.isfinite(s["compute"]["saved_wall_s"])


def test_missing_report_and_records(tmp_path):
    rb = build_round(tmp_path)
    assert "no report" in check_report(rb.dir)[0]
    with pytest.raises(Exception, match="no records.jsonl"):
        write_report(tmp_path / "nothing")


def test_a_pruned_candidate_at_a_later_stage_is_a_problem(tmp_path):
    rb = build_round(tmp_path)
    med = next(r for r in rb.records if (r.task, r.stage, r.candidate) == ("sudoku4", "med", "scalar_l2_trainable"))
    extra = med.model_copy(update={"candidate": "head_l2", "run_key": med.run_key.replace("scalar_l2_trainable",
                                                                                            "head_l2")})
    rb.ledger.append(extra)
    msgs = [p["message"] for p in build_summary(load_round(rb.dir))["problems"]]
    assert any(m.startswith("task sudoku4: head_l2 ran at med but was not promoted at quick: the rule says prune")
               for m in msgs), msgs
    assert f"record {extra.run_key}: not a run of the current spec.yaml (an earlier version of the spec?)" in msgs
    assert not any("finalists at seedcheck" in m for m in msgs)  # read_twice is a control: a quota of its own
    spec = rb.dir / "spec.yaml"
    spec.write_text(spec.read_text().replace("max_finalists: 2", "max_finalists: 1"))
    msgs = [p["message"] for p in build_summary(load_round(rb.dir))["problems"]]
    assert "task sudoku4: 2 FS finalists at seedcheck, the spec allows 1 (seedcheck.max_finalists)" in msgs


def test_planner_agrees_and_gives_task_status(reported):
    rb, _ = reported
    s = summary_of(rb.dir)
    assert s["problems"] == []
    assert s["tasks"]["sudoku4"]["status"].startswith("done") and s["tasks"]["kv_last"]["status"].startswith("done")
    assert len(rb.records) == 45


def test_in_progress_round(tmp_path):
    rb = RoundBuilder(tmp_path)
    for _ in range(3):  # baseline + candidates of quick, then med's baseline and survivors
        for unit in plan(rb.spec, rb.records).runnable:
            rb.add(unit, value_of(unit.task, unit.stage, unit.candidate.name, unit.seed))
    write_report(rb.dir)
    s = summary_of(rb.dir)
    assert s["tasks"]["sudoku4"]["status"] == "running (stage med)"
    assert check_report(rb.dir) == []


# --- a comparison round: seedcheck only, every candidate, nothing pruned -------------------------------------------
def _comparison_spec() -> str:
    """SPEC as a comparison round: the seed check alone, two candidates per task."""
    d = yaml.safe_load(SPEC)
    d["round"] = "compare"
    d["stages"] = {"seedcheck": d["stages"]["seedcheck"]}
    for task in d["tasks"].values():
        task["candidates"] = ["scalar_l2_trainable", "scalar_l1_sched_cos"]
    return yaml.safe_dump(d, sort_keys=False)


COMPARISON_SPEC = _comparison_spec()


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    rb = RoundBuilder(tmp_path_factory.mktemp("compare"), COMPARISON_SPEC)
    rb.run_all()
    return rb, write_report(rb.dir)


def test_comparison_round_report(compared):
    rb, path = compared
    assert len(rb.records) == 2 * 3 * 5 and {r.stage for r in rb.records} == {"seedcheck"}
    s = summary_of(rb.dir)
    assert s["kind"] == "comparison" and s["problems"] == [] and s["rule"]["family_size"] == 4
    for label in ("sudoku4", "kv_last"):
        t = s["tasks"][label]
        assert list(t["stages"]) == ["seedcheck"] and t["status"].startswith("done (finalists: ")
        assert list(t["seedcheck"]["finalists"]) == ["scalar_l2_trainable", "scalar_l1_sched_cos"]
        c = t["compute"]["stages"]["seedcheck"]
        assert c["runs"] == c["full_runs"] == 15
        assert t["compute"]["saved_wall_s"] == pytest.approx(0.0, abs=1e-9)
    # the seed check's decision rule is the screening round's: the same deltas give the same decisions
    dec = {k: s["tasks"][k[0]]["seedcheck"]["finalists"][k[1]]["decision"] for k in SEEDCHECK_DELTAS}
    assert dec == {("sudoku4", "scalar_l2_trainable"): "confirmed", ("sudoku4", "scalar_l1_sched_cos"): "inconclusive",
                   ("kv_last", "scalar_l2_trainable"): "rejected", ("kv_last", "scalar_l1_sched_cos"): "inconclusive"}
    md = path.read_text()
    assert "A comparison round: the seed check is its only stage." in md and "pruning saved" not in md
    assert "Screening stages" not in md and "### Seed check" in md
    for task in ("sudoku4", "kv_last"):
        for kind in ("deltas", "curves"):
            assert (rb.dir / "report" / f"{kind}_{task}.png").stat().st_size > 10_000
    assert "seedcheck scalar_l2_trainable:" in (rb.dir / "report" / "summary.txt").read_text()
    assert check_report(rb.dir) == []


def test_comparison_round_status_and_export(compared, tmp_path):
    from orchestrator.export import export_round
    from orchestrator.progress import format_table, round_status

    rb, _ = compared
    st = round_status(rb.dir)
    assert [(r.task, r.stage, r.state, r.done, r.total, r.pruned) for r in st.rows] == [
        ("sudoku4", "seedcheck", "complete", 15, 15, 0), ("kv_last", "seedcheck", "complete", 15, 15, 0)]
    assert "sudoku4: done (finalists: scalar_l2_trainable, scalar_l1_sched_cos)" in st.notes
    assert "seedcheck" in format_table(st.rows)
    out = export_round(rb.dir, "jsonl", tmp_path / "records.jsonl")
    assert len(out.read_text().splitlines()) == 30


def test_comparison_round_in_progress(tmp_path):
    rb = RoundBuilder(tmp_path, COMPARISON_SPEC)
    for unit in plan(rb.spec, rb.records).runnable:  # the baselines of the first task
        rb.add(unit, value_of(unit.task, unit.stage, unit.candidate.name, unit.seed))
    write_report(rb.dir)
    s = summary_of(rb.dir)
    assert s["kind"] == "comparison" and s["problems"] == []
    assert s["tasks"]["sudoku4"]["status"] == "running (stage seedcheck)"
    assert check_report(rb.dir) == []
    (rb.dir / "spec.yaml").unlink()  # without the spec the records alone say it: no quick runs, seed-check runs
    assert build_summary(load_round(rb.dir))["kind"] == "comparison"


# --- repeated configurations -----------------------------------------------------------------------------------------
def test_repeats_that_differ_are_reported_first(reported):
    """The synthetic round's med and seed-check stages share budget, cadence and seed 0, so the seed check's seed-0
    runs repeat the med runs; the value table gives them different values, which a real round must never do."""
    rb, path = reported
    s = summary_of(rb.dir)
    groups = {(g["task"], g["candidate"], g["seed"]): g for g in s["repeats"]["groups"]}
    assert s["repeats"]["differing"] == len(groups) > 0 and s["repeats"]["identical"] == 0
    g = groups[("sudoku4", "baseline", 0)]
    assert g["values"] == [0.6, 0.61] and [k.split(".")[1] for k in g["run_keys"]] == ["med", "seedcheck"]
    assert groups[("sudoku4", "scalar_l2_trainable", 0)]["values"] == [0.66, pytest.approx(0.64)]
    assert all(seed == 0 for _, _, seed in groups)  # only seed 0 ran in two stages
    md = path.read_text()
    assert md.index("## Not reproducible") < md.index("## Decision rule")
    assert "`sudoku4` | baseline | 0 |" in md
    assert "# NOT REPRODUCIBLE: " in (rb.dir / "report" / "summary.txt").read_text()


def test_report_command_warns_of_repeats_that_differ(reported, tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import cli

    rb, _ = reported
    r = CliRunner().invoke(cli, ["report", str(copy_round(rb, tmp_path))])
    assert r.exit_code == 0 and r.stdout.strip().endswith("report.md")
    n = len(summary_of(rb.dir)["repeats"]["groups"])
    assert r.stderr.strip() == (f"warning: not reproducible: {n} of {n} configurations that ran in more than one "
                                f"stage gave different final metrics (see the report's first section)")


def test_repeats_that_agree_get_one_line(tmp_path):
    def reproducible(task, stage, cand, seed):  # the seed check's seed 0 gives what the med stage gave
        if stage == "seedcheck" and seed == 0:
            return value_of(task, "med", cand, seed)
        return value_of(task, stage, cand, seed)

    rb = RoundBuilder(tmp_path)
    rb.run_all(reproducible)
    md = write_report(rb.dir).read_text()
    s = summary_of(rb.dir)
    assert s["repeats"]["differing"] == 0 and s["repeats"]["identical"] == len(s["repeats"]["groups"]) > 0
    assert "## Not reproducible" not in md
    assert f"Reproducibility: {len(s['repeats']['groups'])} configuration(s) ran in more than one stage" in md
    assert "NOT REPRODUCIBLE" not in (rb.dir / "report" / "summary.txt").read_text()
    assert check_report(rb.dir) == []


# --- seed noise against the threshold --------------------------------------------------------------------------------
def test_noise_from_the_seed_check_is_set_against_single_seed_screens(reported):
    rb, path = reported
    t = summary_of(rb.dir)["tasks"]["sudoku4"]
    n = t["noise"]
    assert n["baseline_n"] == 5 and n["baseline_sd"] == pytest.approx(np.std(BASE_SEEDCHECK, ddof=1), rel=1e-12)
    sds = {c: np.std(SEEDCHECK_DELTAS[("sudoku4", c)], ddof=1) for c in t["seedcheck"]["finalists"]}
    assert n["delta_sd"] == pytest.approx(sds, rel=1e-9)
    assert n["single_seed_spread"] == pytest.approx(1.96 * max(sds.values()), rel=1e-9)
    assert n["single_seed_screens"] == ["quick", "med"] and n["screens_noisy"]  # spread ~0.022 > threshold 0.01
    md = path.read_text()
    section = md[md.index("## Task `sudoku4`"):md.index("## Task `kv_last`")]
    assert n["null_pass_probability"] == pytest.approx(ss.norm.sf(0.01 / max(sds.values())), rel=1e-9)
    assert "### Noise" in section and "**The single-seed screens of this task (quick, med) are mostly seed" in section
    assert f"passes one with probability about {n['null_pass_probability']:.0%}" in section


def test_noise_below_the_threshold_is_only_reported(tmp_path):
    rb = RoundBuilder(tmp_path, SPEC.replace("threshold: 0.01", "threshold: 0.05"))
    rb.run_all()
    md = write_report(rb.dir).read_text()
    n = summary_of(rb.dir)["tasks"]["sudoku4"]["noise"]
    assert list(n["delta_sd"]) == ["scalar_l2_trainable"] and n["single_seed_spread"] < 0.05
    assert not n["screens_noisy"]
    section = md[md.index("## Task `sudoku4`"):md.index("## Task `kv_last`")]
    assert "Seed-to-seed noise at the seed check's budget (80 steps): " in section and "mostly seed noise" not in section
    assert check_report(rb.dir) == []


def test_planner_and_report_take_the_screen_decision_from_one_place(tmp_path, monkeypatch):
    """A screening rule plugged into orchestrator.decisions changes the planner's promotions, the records' decisions
    and the report's stage decisions alike: the report re-derives nothing, and agrees with the planner exactly."""
    from orchestrator import decisions

    class PromoteEverything:
        def decide(self, stage, deltas, threshold):
            mean = decisions.mean_delta(list(deltas.values()))
            return decisions.ScreenDecision(stage, "promote", mean, threshold, "promoted by the test rule")

    def values(task, stage, cand, seed):  # candidates the table has no value for do worse than the baseline
        try:
            return value_of(task, stage, cand, seed)
        except KeyError:
            return value_of(task, stage, "baseline", seed) - 0.01

    monkeypatch.setattr(decisions, "SCREEN_RULE", PromoteEverything())
    rb = RoundBuilder(tmp_path)
    rb.run_all(values)
    s = build_summary(load_round(rb.dir))
    assert s["problems"] == []
    quick = s["tasks"]["sudoku4"]["stages"]["quick"]["candidates"]
    measured = [c for c in quick.values() if c["mean_delta"] is not None]  # a failed run is pruned by any rule
    assert measured and all(c["stage_decision"] == "promote" for c in measured)
    assert any(c["mean_delta"] < s["tasks"]["sudoku4"]["threshold"] for c in measured)
    p = plan(rb.spec, rb.records)
    assert all(d.decision == "promote" for d in p.decisions if d.stage == "quick" and d.mean_delta is not None)


# --- held-out test metrics, every candidate's fate, one SD, words, mixed conditions, sandbox ------------------------
def _with_test_values(lines: list[dict]) -> list[dict]:
    """Each ok run gets a held-out test value of its decision metric: half its validation value."""
    for x in lines:
        if x["status"] == "ok":
            x["test"] = {f"test_{x['metric']}": x["value"] / 2, "test_loss": 1.0}
    return lines


def test_test_metrics_stand_beside_validation_ones(tmp_path):
    rb = build_round(tmp_path)
    edit_records(rb.dir, _with_test_values)
    write_report(rb.dir)
    s = summary_of(rb.dir)
    cand = s["tasks"]["sudoku4"]["stages"]["seedcheck"]["candidates"]["scalar_l2_trainable"]
    for seed, r in cand["seeds"].items():
        assert r["test_delta"] == pytest.approx(r["delta"] / 2)
    assert cand["mean_test_delta"] == pytest.approx(np.mean(SEEDCHECK_DELTAS[("sudoku4", "scalar_l2_trainable")]) / 2)
    assert s["tasks"]["sudoku4"]["stages"]["quick"]["baselines"]["s0"]["test_value"] == pytest.approx(0.25)
    md = (rb.dir / "report" / "report.md").read_text()
    assert "| candidate | seed | run | status | val hole_acc | baseline | val delta | test delta | decision |" in md
    assert "| val hole_acc | test hole_acc | val_loss |" in md  # the matched baselines' table
    assert f"| {0.03 / 2:+.4f} |" in md  # sudoku4 scalar_l2_trainable, seed check seed 0
    txt = (rb.dir / "report" / "summary.txt").read_text()
    assert "    seed=0: baseline=61.00% fs=64.00% d_acc=+3.00pp test_d_acc=+1.50pp" in txt
    assert check_report(rb.dir) == []


def test_every_candidate_has_a_fate(reported):
    rb, path = reported
    fates = summary_of(rb.dir)["tasks"]["sudoku4"]["fates"]
    assert list(fates) == ["scalar_l2_trainable", "scalar_l1_sched_cos", "head_l2", "read_twice"]
    assert fates["head_l2"]["reached"] == "quick" and fates["head_l2"]["outcome"] == "pruned"
    assert "quick" in fates["head_l2"]["reason"]
    assert fates["read_twice"]["control"] and fates["read_twice"]["failed_runs"] == \
        ["quick seed 0: failed (crash: worker crashed)"]
    assert fates["scalar_l2_trainable"]["outcome"] == "seed check: confirmed"
    assert not fates["scalar_l2_trainable"]["control"]
    md = path.read_text()
    section = md[md.index("### What happened to each candidate"):]
    section = section[:section.index("### Matched baselines")]
    for name in fates:
        assert f"| {name} |" in section


def test_a_candidate_cut_by_max_finalists_keeps_its_story(tmp_path):
    rb = RoundBuilder(tmp_path, SPEC.replace("max_finalists: 2", "max_finalists: 1"))
    rb.run_all()
    write_report(rb.dir)
    fates = summary_of(rb.dir)["tasks"]["sudoku4"]["fates"]
    # both FS candidates passed med; the one with the smaller med delta is cut by the finalist quota
    cut = fates["scalar_l1_sched_cos"]
    assert cut["reached"] == "med" and cut["outcome"] == "pruned" and "max_finalists" in cut["reason"]
    assert fates["scalar_l2_trainable"]["outcome"].startswith("seed check: ")
    md = (rb.dir / "report" / "report.md").read_text()
    assert re.search(r"\| scalar_l1_sched_cos \| FS \| med \| pruned \| [^|]*max_finalists", md)


def test_one_sample_sd_everywhere_and_labelled(reported):
    rb, path = reported
    s = summary_of(rb.dir)
    f = s["tasks"]["sudoku4"]["seedcheck"]["finalists"]["scalar_l2_trainable"]
    assert f["sd"] == pytest.approx(np.std(SEEDCHECK_DELTAS[("sudoku4", "scalar_l2_trainable")], ddof=1))
    md = path.read_text()
    assert "| sample SD (n−1) |" in md and "sample SD (n−1) of" in md
    txt = (rb.dir / "report" / "summary.txt").read_text()
    assert "std=" not in txt and "sd(n-1) = sample standard deviation" in txt
    assert f"sd(n-1)={f['sd']:.4f}" in txt  # the same number in both files


def test_summary_txt_names_the_control_and_keeps_confirmed_for_the_seed_check(tmp_path, reported):
    d = yaml.safe_load(COMPARISON_SPEC)
    for task in d["tasks"].values():
        task["candidates"] = ["scalar_l2_trainable", "read_twice"]
    rb = RoundBuilder(tmp_path, yaml.safe_dump(d, sort_keys=False))
    rb.run_all(lambda task, stage, cand, seed: BASE_SEEDCHECK[seed] + (0 if cand == "baseline" else 0.01 * seed))
    write_report(rb.dir)
    txt = (rb.dir / "report" / "summary.txt").read_text()
    assert "  seedcheck read_twice:" in txt and "read_twice=" in txt
    block = txt[txt.index("  seedcheck read_twice:"):].split("\n  seedcheck ")[0]
    assert " fs=" not in block.split("decision=")[0]
    paired = txt[txt.index("'candidate': 'read_twice'"):]
    assert " fs=" not in paired.split("filter:")[0] and "read_twice=" in paired
    # a screening round's single-seed med stage is a screen, never "confirmed"
    rtxt = (reported[0].dir / "report" / "summary.txt").read_text()
    assert "  med screen (1 seed):" in rtxt
    for line in rtxt.splitlines():
        if "confirm" in line.lower() and not line.startswith("#"):
            assert "decision=CONFIRMED" in line, line


def _rerun_seedcheck_at(rb: RoundBuilder, steps: int) -> None:
    """The spec's seed check is edited (another budget) and the round run again into the same folder."""
    text = rb.spec_text.replace("seedcheck: {steps: 80", f"seedcheck: {{steps: {steps}")
    rb.spec = parse_spec_text(text)
    (rb.dir / "spec.yaml").write_text(text)
    rb.run_all(lambda task, stage, cand, seed: value_of(task, stage, cand, seed) + (0.2 if stage == "seedcheck" else 0))


def test_runs_of_different_conditions_are_never_pooled(tmp_path):
    rb = build_round(tmp_path)
    rb.spec_text = SPEC
    old = {r.run_key for r in rb.records if r.stage == "seedcheck"}
    _rerun_seedcheck_at(rb, 90)
    write_report(rb.dir)
    s = summary_of(rb.dir)
    assert {r["run_key"] for r in s["mixed_conditions"]} == old
    sc = s["tasks"]["sudoku4"]["stages"]["seedcheck"]
    assert sc["budget_steps"] == 90 and len(sc["baselines"]) == 5
    assert [b["value"] for b in sc["baselines"].values()] == pytest.approx([v + 0.2 for v in BASE_SEEDCHECK])
    f = s["tasks"]["sudoku4"]["seedcheck"]["finalists"]["scalar_l2_trainable"]
    assert f["n"] == 5 and f["mean"] == pytest.approx(np.mean(SEEDCHECK_DELTAS[("sudoku4", "scalar_l2_trainable")]))
    md = (rb.dir / "report" / "report.md").read_text()
    assert md.index("## Runs of different conditions: NOT POOLED") < md.index("## Decision rule")
    assert "80 steps, eval every 40" in md
    txt = (rb.dir / "report" / "summary.txt").read_text()
    assert "# MIXED CONDITIONS: 30 run(s)" in txt
    # the check re-derives the same report; its only findings are the integrity ones (records of an earlier spec)
    assert all(m.startswith("integrity: record ") and "not a run of the current spec.yaml" in m
               for m in check_report(rb.dir))
    # without a spec, each stage keeps the conditions of its latest run
    edit_records(rb.dir, lambda lines: [{**x, "finished_at": "2026-01-02T00:00:00+00:00"}
                                        if x["budget_steps"] == 90 else x for x in lines])
    (rb.dir / "spec.yaml").unlink()
    s = build_summary(load_round(rb.dir))
    assert {r["run_key"] for r in s["mixed_conditions"]} == old
    assert s["tasks"]["sudoku4"]["stages"]["seedcheck"]["budget_steps"] == 90


def test_sandbox_and_seed_controls_are_shown_and_unsafe_is_loud(tmp_path):
    rb = build_round(tmp_path)
    edit_records(rb.dir, lambda lines: [{**x, "sandbox": "enforced", "seed_controls": ["data_order", "init"]}
                                        for x in lines])
    write_report(rb.dir)
    md = (rb.dir / "report" / "report.md").read_text()
    n = len(rb.records)
    assert f"Sandbox (how model-written code ran, from the records' `sandbox`): enforced: {n} run(s)." in md
    assert f"What a run's seed varied: the data order and the initialisation in {n} run(s)." in md
    assert "SANDBOX OFF" not in md
    unsafe = key_of(rb.dir, "sudoku4", "quick", "baseline", 0)
    edit_records(rb.dir, lambda lines: [{**x, "sandbox": "unsafe"} if x["run_key"] == unsafe else x for x in lines])
    write_report(rb.dir)
    md = (rb.dir / "report" / "report.md").read_text()
    assert md.index("## SANDBOX OFF") < md.index("## Decision rule") and f"`{unsafe}`" in md
    assert "# SANDBOX OFF: 1 run(s)" in (rb.dir / "report" / "summary.txt").read_text()
    assert check_report(rb.dir) == []


# --- the protocol's error rates (simulated) and the cost of each decision -------------------------------------------
def test_rates_are_opt_in_simulated_by_the_real_simulator_and_rederived(tmp_path):
    from orchestrator import simulate as sim

    rb = build_round(tmp_path)
    write_report(rb.dir)
    assert "rates" not in summary_of(rb.dir)
    assert "Not computed: `fsearch report synth --rates`" in (rb.dir / "report" / "report.md").read_text()
    write_report(rb.dir, rates=True, replicates=12)
    r = summary_of(rb.dir)["rates"]
    assert (r["replicates"], r["seed"], r["effect_sd"]) == (12, 0, 1.0)
    # the numbers are orchestrator.simulate's for this round's spec under the noise measured in its records
    model = sim.model_from_noise(rb.spec, sim.noise_from_round(rb.dir))
    direct = sim.simulate(sim.Protocol.from_spec(rb.spec), model, sim.Scenario.null(), 12, 0)
    assert r["null"]["fwer"] == direct.fwer.as_dict()
    assert r["null"]["cost_per_candidate"] == direct.cost_per_candidate.as_dict()
    assert r["noise"]["task_sd"]["sudoku4"]["seedcheck"] == pytest.approx(
        np.std(SEEDCHECK_DELTAS[("sudoku4", "scalar_l2_trainable")] + SEEDCHECK_DELTAS[("sudoku4",
                                                                                       "scalar_l1_sched_cos")],
               ddof=1), rel=0.5)  # pooled within candidates: near the spread of both candidates' deltas
    assert 0.0 <= r["one_real"]["power"]["value"] <= 1.0
    md = (rb.dir / "report" / "report.md").read_text()
    assert "## Error rates of this protocol (simulated)" in md and "12 simulated rounds per row, seed 0" in md
    assert check_report(rb.dir) == []  # --check simulates again with the stored replicates and seed
    path = rb.dir / "report" / "summary.json"
    s = json.loads(path.read_text())
    s["rates"]["null"]["fwer"]["value"] = 0.999
    path.write_text(json.dumps(s))
    assert any(m.startswith("rates.null.fwer.value: report says 0.999") for m in check_report(rb.dir))


def test_rates_without_a_spec_say_why(tmp_path):
    rb = build_round(tmp_path)
    (rb.dir / "spec.yaml").unlink()
    write_report(rb.dir, rates=True, replicates=2)
    assert "Not available: no readable spec.yaml" in (rb.dir / "report" / "report.md").read_text()
    assert check_report(rb.dir) == []


def test_wall_time_per_decision(reported):
    rb, path = reported
    stages = summary_of(rb.dir)["tasks"]["sudoku4"]["compute"]["stages"]
    quick = [r for r in rb.records if (r.task, r.stage) == ("sudoku4", "quick")]
    assert stages["quick"]["decisions"] == 4  # four candidates were decided at quick, the baseline served them all
    assert stages["quick"]["wall_per_decision_s"] == pytest.approx(math.fsum(r.wall_s for r in quick) / 4)
    assert stages["seedcheck"]["decisions"] == 2
    assert "| decisions | wall s per decision |" in path.read_text()


def test_report_command_rates_and_loud_warnings(tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import cli

    rb = build_round(tmp_path)
    rb.spec_text = SPEC
    _rerun_seedcheck_at(rb, 90)
    r = CliRunner().invoke(cli, ["report", str(rb.dir), "--rates", "--replicates", "3"])
    assert r.exit_code == 0, r.output
    assert "warning: 30 run(s) share a task, stage, candidate and seed with runs of other conditions" in r.output
    assert summary_of(rb.dir)["rates"]["replicates"] == 3
    r = CliRunner().invoke(cli, ["report", str(rb.dir), "--replicates", "0"])
    assert r.exit_code == 2 and "Traceback" not in r.output
