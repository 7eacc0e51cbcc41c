"""`fsearch bench round`: one spec's whole round under several execution settings, one after another.

Each variant overrides keys of the spec's `defaults` (`worker=warm,compile=eager-graphs`), gets a round of its own in
a fresh folder (its own study, records and batch probe), and is run as `fsearch round --spec ... --no-report` would
run it. Per variant: the round's wall time (start to exit of the round command), the runs (finished and failed), their
start-up (`first_step_s`: worker process start, or the run's start in a warm worker, to the end of its first step; the
round's first run, then the median and maximum over all runs), their summed wall time and median tokens/s, and the
ratio of the first variant's round time to this one's. Then whether each variant reached the same decisions as the
first (same runs — task, stage, candidate, seed — and the same decision for each) and, where the runs' identities are
the same (settings that do not change a run's numbers, such as `worker`), whether their records are equal apart from
timings. A torch-free control-plane command: the rounds run as subprocesses.

    fsearch bench round --spec gpu_demo --variant worker=fresh,compile=off --variant worker=warm,compile=auto
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import UserError
from orchestrator.paths import RoundPaths
from orchestrator.processes import with_checkout_on_path
from orchestrator.records import Ledger, Record
from orchestrator.spec import SpecError, find_spec_file, load_spec

DEFAULT_VARIANTS = ("worker=fresh", "worker=warm")
# what varies between two executions of the same run without changing its numbers
TIMING_FIELDS = ("round", "run_dir", "wall_s", "tokens_per_s", "peak_mem_bytes", "first_step_s", "finished_at")


def parse_variant(text: str) -> dict[str, Any]:
    """`key=value,key=value` -> {key: value}: numbers as numbers, anything else as the text given (`compile=on` is the
    step mode "on", not YAML's true)."""
    out: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        key, eq, value = part.partition("=")
        if not part or not eq or not key.strip() or not value.strip():
            raise UserError(f"--variant {text!r}: expected key=value[,key=value...] (keys of the spec's defaults)")
        value = value.strip()
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        out[key.strip()] = parsed if isinstance(parsed, (int, float)) and not isinstance(parsed, bool) else value
    return out


def variant_label(changes: dict[str, Any]) -> str:
    """A round-name-safe label of a variant's values (`fresh_off`)."""
    label = "_".join(str(v) for v in changes.values())
    return re.sub(r"[^A-Za-z0-9_.-]", "-", label)


def variant_spec(base: dict, changes: dict[str, Any], round_name: str, output: Path) -> dict:
    """The spec data of one variant: the base spec with `defaults` updated, its own round name and output folder, and
    its study in SQLite in the round's folder (a storage the base spec names is dropped)."""
    data = copy.deepcopy(base)
    data["round"] = round_name
    data["output"] = str(output)
    data.pop("storage", None)
    defaults = dict(data.get("defaults") or {})
    defaults.update(changes)
    data["defaults"] = defaults
    return data


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(records: list[Record]) -> dict[str, Any]:
    first = [r.first_step_s for r in records if r.first_step_s is not None]
    rates = [r.tokens_per_s for r in records if r.status == "ok" and r.tokens_per_s]
    return {"runs": len(records), "ok": sum(r.status == "ok" for r in records),
            "failed": sum(r.status != "ok" for r in records),
            # the round's first run (ledger order) pays a warm worker's process start; later runs show what warm saves
            "first_step_s_first": records[0].first_step_s if records else None,
            "first_step_s_median": median(first), "first_step_s_max": max(first) if first else None,
            "run_wall_s_sum": sum(r.wall_s for r in records), "tokens_per_s_median": median(rates),
            "step_modes": sorted({r.step_mode for r in records if r.step_mode}),
            "devices": sorted({r.device for r in records if r.device})}


def decisions(records: list[Record]) -> dict[tuple, str]:
    return {(r.task, r.stage, r.candidate, r.seed): r.decision for r in records}


def comparable(records: list[Record]) -> dict[str, dict]:
    return {r.run_key: {k: v for k, v in r.model_dump().items() if k not in TIMING_FIELDS} for r in records}


def compare(first: list[Record], other: list[Record]) -> dict[str, Any]:
    """Decisions and (where the run keys are the same) records of `other` against `first`."""
    a, b = decisions(first), decisions(other)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    out: dict[str, Any] = {"same_decisions": not differ,
                           "decisions_differ": [".".join(map(str, k)) for k in differ][:20]}
    ca, cb = comparable(first), comparable(other)
    out["same_runs"] = set(ca) == set(cb)
    out["same_records"] = out["same_runs"] and ca == cb
    return out


def run_round(spec_path: Path, log_path: Path, timeout_s: float | None) -> tuple[int | str, float]:
    """`fsearch round --spec SPEC --no-report` in a subprocess; (exit code or "timeout", wall seconds)."""
    argv = [sys.executable, "-m", "orchestrator.cli", "round", "--spec", str(spec_path), "--no-report"]
    env = with_checkout_on_path(dict(os.environ))
    t0 = time.time()
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=timeout_s)
            code: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return code, time.time() - t0


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("variant", "exit", "round s", "speed-up", "runs ok/all", "first step s (1st run; median, max)",
            "run s (sum)", "tok/s (median)", "decisions", "records")
    lines = [head]
    for r in rows:
        lines.append((r["variant"], str(r["exit"]), fmt(r["round_wall_s"]), fmt(r.get("speedup"), ".2f") + "x",
                      f"{r['ok']}/{r['runs']}", f"{fmt(r['first_step_s_first'], '.2f')}; "
                      f"{fmt(r['first_step_s_median'], '.2f')}, "
                      f"{fmt(r['first_step_s_max'], '.2f')}", fmt(r["run_wall_s_sum"]),
                      fmt(r["tokens_per_s_median"], ".0f"),
                      "-" if r.get("same_decisions") is None else ("same" if r["same_decisions"] else "DIFFER"),
                      "-" if r.get("same_records") is None else
                      ("equal" if r["same_records"] else ("differ" if r["same_runs"] else "other runs"))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fsearch bench round", description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="spec file (a name also finds studies/NAME.yaml)")
    ap.add_argument("--variant", action="append", default=None,
                    help="keys of the spec's defaults to set, `key=value[,key=value...]`; repeat for each variant "
                         f"(default: {' and '.join(DEFAULT_VARIANTS)}); the first is the reference")
    ap.add_argument("--out", default=None,
                    help="folder for the variants' rounds (default: results/bench_round/<round>-<UTC time>)")
    ap.add_argument("--timeout-s", type=float, default=None, help="stop a variant's round after this many seconds")
    ap.add_argument("--json", help="also append one JSON line per variant to this file")
    args = ap.parse_args(argv)
    try:
        return bench(args)
    except (UserError, SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def bench(args: argparse.Namespace) -> int:
    spec_file = find_spec_file(args.spec)
    base_spec = load_spec(spec_file)
    base = yaml.safe_load(spec_file.read_text(encoding="utf-8"))
    texts = list(args.variant or DEFAULT_VARIANTS)
    variants = [parse_variant(v) for v in texts]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or Path("results") / "bench_round" / f"{base_spec.round}-{stamp}").resolve()
    labels = [variant_label(v) for v in variants]
    if len(set(labels)) != len(labels):
        raise UserError("--variant: two variants are the same")
    planned, written, made_out = [], [], not out.exists()
    try:  # every variant's spec is checked before any round runs
        for text, changes, label in zip(texts, variants, labels):
            path = out / f"{label}.yaml"
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(variant_spec(base, changes, f"{base_spec.round}-{label}", out),
                                           sort_keys=False), encoding="utf-8")
            written.append(path)
            try:
                spec = load_spec(path)
            except SpecError as e:
                raise UserError(f"--variant {text}: {e}") from None
            if (Path(spec.round_dir) / "records.jsonl").exists():
                raise UserError(f"{spec.round_dir} has records already: give another --out")
            planned.append((changes, label, path, spec))
    except UserError:
        for path in written:
            path.unlink(missing_ok=True)
        if made_out and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise
    rows: list[dict[str, Any]] = []
    reference: list[Record] | None = None
    for changes, label, path, spec in planned:
        print(f"round {spec.round} ({', '.join(f'{k}={v}' for k, v in changes.items())}) ...", flush=True)
        code, wall = run_round(path, out / f"{label}.log", args.timeout_s)
        records = Ledger(RoundPaths(Path(spec.round_dir)).records).read()
        row: dict[str, Any] = {"bench": "round", "spec": str(spec_file), "variant": label, "settings": changes,
                               "exit": code, "round_wall_s": wall, **summarize(records)}
        if reference is None:
            reference = records
            row["speedup"] = 1.0
        else:
            row["speedup"] = rows[0]["round_wall_s"] / wall if wall > 0 else None
            row.update(compare(reference, records))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(table(rows))
    print(f"rounds, specs and logs: {out}")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
