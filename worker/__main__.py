"""`python -m worker RUN.json` | `python -m worker --probe PROBE.json` | `python -m worker --serve`: what the scheduler
spawns (one process per run, the batch probe, or one process for a round's runs: spec `defaults.worker: warm`)."""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

from orchestrator.runconfig import EXIT_CRASH, EXIT_OK
from worker.probe import probe
from worker.run import process_age_s, run


def serve(stdin=None) -> int:
    """Runs one after another, each named by a line `RUN.json<TAB>LOG` on stdin, until stdin ends. Each run's output
    goes to its LOG; its exit code (as `python -m worker RUN.json` would exit) is written as one line to the stdout
    this process started with. After a run that does not end with 0 the process exits with that code: the scheduler
    starts a fresh one for the next run (a clean CUDA context after an out-of-memory error or a crash)."""
    stdin = stdin or sys.stdin
    status = os.fdopen(os.dup(1), "w", buffering=1)
    started_at: float | None = time.time() - process_age_s()  # the first run pays the process's start-up
    for line in stdin:
        line = line.rstrip("\n")
        if not line:
            continue
        run_file, _, log = line.partition("\t")
        sys.stdout.flush()
        sys.stderr.flush()
        with open(log or os.devnull, "ab", buffering=0) as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                code = run(Path(run_file), started_at=started_at)
            except BaseException:  # run() records its own failures; anything past it is a crash of this run
                import traceback

                traceback.print_exc()
                code = EXIT_CRASH
            sys.stdout.flush()
            sys.stderr.flush()
        started_at = None
        gc.collect()  # the run's model, optimizer and graphs go before the next run starts
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        status.write(f"{code}\n")
        if code != EXIT_OK:
            return code
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker", description="One fsearch training run (or the GPU batch probe).")
    ap.add_argument("config", nargs="?", help="RUN.json (an orchestrator.runconfig.RunConfig)")
    ap.add_argument("--probe", help="PROBE.json: run the GPU batch probe instead")
    ap.add_argument("--serve", action="store_true", help="run the runs named on stdin one after another (RUN.json<TAB>LOG "
                                                         "per line), reporting each exit code on stdout")
    args = ap.parse_args(argv)
    if args.serve:
        return serve()
    if args.probe:
        return probe(Path(args.probe))
    if not args.config:
        ap.error("give RUN.json, --probe PROBE.json or --serve")
    return run(Path(args.config), started_at=time.time() - process_age_s())


if __name__ == "__main__":
    sys.exit(main())
