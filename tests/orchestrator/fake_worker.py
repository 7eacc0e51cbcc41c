"""A stand-in for `python -m worker` in scheduler tests: no torch, milliseconds per run.

    python tests/orchestrator/fake_worker.py RUN.json
    python tests/orchestrator/fake_worker.py --probe PROBE.json

It honours the worker's file contract (config.json, metrics.jsonl, progress.json, result.json written atomically,
exit codes of orchestrator.runconfig) and the fault hooks of RunConfig.fault. Its metrics are a deterministic
function of the run's identity (`metric_value`), so tests can compute the decisions a round must reach.

Environment knobs (all optional):
  FAKE_WORKER_STEP_S     seconds slept per training step (default 0.001)
  FAKE_WORKER_EFFECTS    JSON {candidate name: effect on the primary metric}; unnamed candidates: a hash in +-0.04
  FAKE_WORKER_NO_RESULT  "1": failures exit with their code but write no result.json (exit-code fallback)
  FAKE_PROBE_MAX         largest micro-batch the fake device holds in the batch probe (default 8)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _exit_codes() -> dict[str, int]:
    """The worker's exit codes, read from orchestrator/runconfig.py's source (importing it would cost the pydantic
    import in every fake run; reading keeps the two in sync)."""
    text = (REPO / "orchestrator" / "runconfig.py").read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^EXIT_(\w+) = (\d+)", text, re.M)}


_CODES = _exit_codes()
EXIT_OK, EXIT_CRASH, EXIT_OOM, EXIT_DATA, EXIT_CONFIG = (_CODES[k] for k in ("OK", "CRASH", "OOM", "DATA", "CONFIG"))
PROBE_FILE = re.search(r'^PROBE_FILE = "(.+)"', (REPO / "orchestrator" / "runconfig.py").read_text(), re.M).group(1)

BASE = {"baseline": 0.0, "read_twice": 0.01}
PRIMARY = {"sudoku": "hole_acc"}  # the common test task, without importing the task registry


def candidate_effect(candidate: str) -> float:
    effects = json.loads(os.environ.get("FAKE_WORKER_EFFECTS") or "{}")
    if candidate in effects:
        return float(effects[candidate])
    if candidate in BASE:
        return BASE[candidate]
    h = int(hashlib.sha256(candidate.encode()).hexdigest()[:8], 16)
    return (h / 0xFFFFFFFF - 0.5) * 0.08


def seed_noise(seed: int) -> float:
    return ((seed * 7919) % 11 - 5) * 0.001


def metric_value(candidate: str, seed: int, step: int, budget: int) -> float:
    """The primary validation metric at `step` of a run with this budget: grows with training, shifted by the
    candidate's effect and a small per-seed offset; within [0, 1]."""
    progress = 0.5 * (1 - math.exp(-3 * step / max(1, budget))) + 0.2 * min(1.0, budget / 1000)
    return min(1.0, max(0.0, 0.2 + progress + candidate_effect(candidate) + seed_noise(seed)))


def primary_metric(task_kind: str) -> str:
    if task_kind in PRIMARY:
        return PRIMARY[task_kind]
    try:
        from tasks import task_class

        return task_class(task_kind).primary_metric
    except Exception:  # noqa: BLE001
        return "tok_acc"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def fail(run_dir: Path, kind: str, message: str, code: int, steps: int = 0, **extra) -> int:
    if os.environ.get("FAKE_WORKER_NO_RESULT") != "1":
        write_json_atomic(run_dir / "result.json", {"status": "failed", "error_kind": kind, "error_message": message,
                                                    "steps": steps, **extra})
    print(f"fake worker: {kind}: {message}", file=sys.stderr)
    return code


def run(path: Path) -> int:
    cfg = json.loads(path.read_text())
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", {**cfg, "pid": os.getpid()})
    fault = cfg.get("fault")
    steps, eval_every, batch = cfg["steps"], cfg["eval_every"], cfg["batch_size"]
    mb = cfg.get("micro_batch") or batch
    step_s = float(os.environ.get("FAKE_WORKER_STEP_S", "0.001"))
    metric = primary_metric(cfg["task_kind"])
    t0 = time.time()

    if fault == "data":
        return fail(run_dir, "data", "injected data fault (test hook)", EXIT_DATA)
    if fault == "hang":
        # a grandchild in the same process group: the scheduler's time limit must kill the whole group
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        (run_dir / "grandchild.pid").write_text(str(child.pid))
        write_json_atomic(run_dir / "progress.json", {"step": 0, "steps": steps, "loss": None, "eta_s": None})
        while True:
            time.sleep(3600)
    if fault == "crash" or (fault == "crash_once" and cfg.get("attempt", 0) == 0):
        if os.environ.get("FAKE_WORKER_NO_RESULT") == "1":
            raise RuntimeError("injected crash (test hook)")
        return fail(run_dir, "crash", "RuntimeError: injected crash (test hook)", EXIT_CRASH)
    if fault == "oom_always" or (fault == "oom" and mb == batch):
        return fail(run_dir, "oom", "injected out-of-memory (test hook)", EXIT_OOM, micro_batch=mb)

    rows = []
    loss = 2.0
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(0, steps + 1):
            if step:
                time.sleep(step_s)
                loss = 2.0 * math.exp(-step / max(1, steps))
                if fault == "diverge" and step >= 2:
                    result = {"status": "diverged", "error_kind": "diverged",
                              "error_message": f"non-finite training loss at step {step}", "steps": step - 1,
                              "primary_metric": metric, "micro_batch": mb, "grad_accum": batch // mb,
                              "wall_s": time.time() - t0, "device": "fake"}
                    write_json_atomic(run_dir / "result.json", result)
                    return EXIT_OK
                write_json_atomic(run_dir / "progress.json", {"step": step, "steps": steps, "loss": loss,
                                                             "tokens_per_s": 1000.0, "eta_s": (steps - step) * step_s})
            if step == 0 or step % eval_every == 0 or step == steps:
                v = metric_value(cfg["candidate"], cfg["seed"], step, steps)
                row = {"step": step, "val_loss": round(2.0 - v, 6), "val_tok_acc": round(v, 6),
                       "val_exact": round(v / 2, 6), f"val_{metric}": round(v, 6)}
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
    final = {k: v for k, v in rows[-1].items() if k.startswith("val_")}
    best_row = max(rows, key=lambda r: (r[f"val_{metric}"], -r["step"]))
    result = {"status": "ok", "steps": steps, "final": final,
              "best": {k: v for k, v in best_row.items() if k.startswith("val_")}, "best_step": best_row["step"],
              "test": {"test_loss": final["val_loss"], f"test_{metric}": final[f"val_{metric}"]},
              "primary_metric": metric, "wall_s": time.time() - t0, "train_tokens": steps * batch * 10,
              "tokens_per_s": 1000.0, "peak_mem_bytes": 1000 * mb, "micro_batch": mb, "grad_accum": batch // mb,
              "device": "fake"}
    write_json_atomic(run_dir / "result.json", result)
    return EXIT_OK


def probe(path: Path) -> int:
    spec = json.loads(path.read_text())
    out = path.with_name("probe_result.json")
    if spec["run"].get("fault") == "data":
        write_json_atomic(out, {"error_kind": "data", "error_message": "injected data fault (test hook)"})
        return EXIT_DATA
    limit = int(os.environ.get("FAKE_PROBE_MAX", "8"))
    tried = []
    for mb in sorted(spec["candidates"], reverse=True):
        ok = mb <= limit
        tried.append({"micro_batch": mb, "ok": ok, "error_kind": None if ok else "oom",
                      "peak_mem_bytes": 1000 * mb if ok else None})
        if ok:
            write_json_atomic(out, {"micro_batch": mb, "peak_mem_bytes": 1000 * mb, "device_mem_bytes": 1000 * limit,
                                    "tried": tried, "device": "fake", "pid": os.getpid()})
            return EXIT_OK
    write_json_atomic(out, {"error_kind": "oom", "error_message": "no candidate micro-batch fits", "tried": tried})
    return EXIT_OOM


def main(argv: list[str]) -> int:
    if argv == ["--serve"]:  # the real worker's serving loop, around this stand-in's run
        from worker.serve import serve

        return serve(lambda path, started_at=None: probe(path) if path.name == PROBE_FILE else run(path))
    if argv[:1] == ["--probe"]:
        return probe(Path(argv[1]))
    if len(argv) != 1:
        print("usage: fake_worker.py RUN.json | --probe PROBE.json | --serve", file=sys.stderr)
        return EXIT_CONFIG
    return run(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
