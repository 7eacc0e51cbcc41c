"""`python -m worker RUN.json` | `python -m worker --probe PROBE.json`: what the scheduler spawns."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from worker.probe import probe
from worker.run import process_age_s, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker", description="One fsearch training run (or the GPU batch probe).")
    ap.add_argument("config", nargs="?", help="RUN.json (an orchestrator.runconfig.RunConfig)")
    ap.add_argument("--probe", help="PROBE.json: run the GPU batch probe instead")
    args = ap.parse_args(argv)
    if args.probe:
        return probe(Path(args.probe))
    if not args.config:
        ap.error("give RUN.json or --probe PROBE.json")
    return run(Path(args.config), started_at=time.time() - process_age_s())


if __name__ == "__main__":
    sys.exit(main())
