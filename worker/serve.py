"""`python -m worker --serve`: one process runs runs one after another (spec `defaults.worker: warm`). Torch-free: the
caller passes its run function, so the test stand-in for the worker serves with the same loop."""
from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, TextIO

EXIT_OK, EXIT_CRASH = 0, 1  # as orchestrator.runconfig's
STATUS_PREFIX = "fsearch-exit "  # a status line; anything else a library prints to the original stdout is not one
RETIRE_SUFFIX = " retire"  # after the code: the run ended well, but this process ends too (released())
LEFTOVER_LIMIT_BYTES = 256 * 2 ** 20


def serve(run: Callable[..., int], started_at: float | None = None, stdin: TextIO | None = None) -> int:
    """Runs one after another, each named by a line `RUN.json<TAB>LOG` on stdin, until stdin ends. Each run's output
    goes to its LOG; its exit code (as `python -m worker RUN.json` would exit) is written as one line
    `fsearch-exit CODE` to the stdout this process started with. After a run that does not end with 0 the process
    exits with that code: the scheduler starts a fresh one for the next run (a clean CUDA context after an
    out-of-memory error or a crash); so it does after a run that left GPU memory held (`fsearch-exit 0 retire`).
    `run(path, started_at=...)`: the first run counts its start-up from `started_at` (the process's start)."""
    stdin = stdin or sys.stdin
    status = os.fdopen(os.dup(1), "w", buffering=1)
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
            except BaseException:  # the run records its own failures; anything past it is a crash of this run
                traceback.print_exc()
                code = EXIT_CRASH
            sys.stdout.flush()
            sys.stderr.flush()
        started_at = None
        retire = code == EXIT_OK and not released(run_file)
        status.write(f"{STATUS_PREFIX}{code}{RETIRE_SUFFIX if retire else ''}\n")
        if code != EXIT_OK or retire:
            return code
    return EXIT_OK


def released(run_file: Path) -> bool:
    """After a run: its model, optimizer and graphs collected and the GPU's cached blocks returned. False where more
    than LEFTOVER_LIMIT_BYTES of GPU memory is still held (something of the run outlived it): the process then
    ends after reporting the run, and the next run gets a fresh one rather than less memory than its batch probe
    measured."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return True
    clear_workspaces = getattr(getattr(torch, "_C", None), "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces is not None:  # cuBLAS's per-stream workspaces are cached blocks too: let them go
        clear_workspaces()
    torch.cuda.empty_cache()
    left = torch.cuda.memory_reserved()  # tensors still alive, and the memory pools of CUDA graphs still alive
    if left <= LEFTOVER_LIMIT_BYTES:
        return True
    print(f"warm worker: {left / 2 ** 20:.0f} MiB of GPU memory still held after {run_file}; the next run gets "
          "a fresh process", file=sys.stderr, flush=True)
    return False


def started_at() -> float:
    """When this process started (time.time() scale), from /proc where it is readable, else now."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        age = 0.0
    return time.time() - age
