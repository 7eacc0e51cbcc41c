"""`python -m worker RUN.json` | `python -m worker --probe PROBE.json` | `python -m worker --serve`: what the scheduler
spawns (one process per run, the batch probe, or one process for a round's batch probes and runs: spec
`defaults.worker: warm`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.serve import serve, started_at


def main(argv: list[str] | None = None) -> int:
    t0 = started_at()
    ap = argparse.ArgumentParser(prog="python -m worker", description="One fsearch training run (or the GPU batch probe).")
    ap.add_argument("config", nargs="?", help="RUN.json (an orchestrator.runconfig.RunConfig)")
    ap.add_argument("--probe", help="PROBE.json: run the GPU batch probe instead")
    ap.add_argument("--serve", action="store_true",
                    help="run the runs named on stdin one after another (RUN.json<TAB>LOG per line), reporting each "
                         "exit code on stdout (worker/serve.py)")
    args = ap.parse_args(argv)
    from orchestrator.runconfig import PROBE_FILE
    from worker.probe import probe
    from worker.run import run

    if args.serve:  # runs, and batch probes (a file named PROBE_FILE), one after another
        return serve(lambda path, started_at=None: probe(path) if path.name == PROBE_FILE else
                     run(path, started_at=started_at), started_at=t0)
    if args.probe:
        return probe(Path(args.probe))
    if not args.config:
        ap.error("give RUN.json, --probe PROBE.json or --serve")
    return run(Path(args.config), started_at=t0)


if __name__ == "__main__":
    sys.exit(main())
