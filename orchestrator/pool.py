"""`fsearch round --workers N` on a shared (PostgreSQL) storage: N `fsearch worker` processes on this host, one device
each, watched by the round's coordinator. Torch-free.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.loop import raise_keyboard_interrupt
from orchestrator.outcomes import log_tail
from orchestrator.processes import TERM_GRACE_S, WorkerProcess, start_worker, worker_environment
from orchestrator.records import Record
from orchestrator.round_errors import SchedulerError

if TYPE_CHECKING:
    from orchestrator.scheduler import SharedScheduler

POOL_POLL_S = 0.5  # how often `fsearch round --workers N` looks at its workers and the round's records


class WorkerPool:
    """`fsearch round --workers N` on a shared storage: N `fsearch worker` processes on this host, one device each
    (CUDA_VISIBLE_DEVICES), watched by this coordinator, which holds the round lock.

    Each worker's output goes to <round>/workers/worker-<i>.log; the coordinator prints each record as the database
    gets it. The workers die with the coordinator (and their runs with them). A worker that dies leaves its unit to the
    others; when all have exited with the plan unfinished, the round stops with one line naming the failed workers
    (run the same command to resume: units of this host's dead workers are taken over at once)."""

    def __init__(self, coordinator: "SharedScheduler", n: int, spec_file: Path, devices: list[str | None],
                 poll_s: float = POOL_POLL_S):
        if n < 1 or len(devices) != n:
            raise SchedulerError(f"--workers {n}: needs one device entry per worker, got {devices}")
        self.c, self.n, self.spec_file, self.devices, self.poll_s = coordinator, n, Path(spec_file), devices, poll_s
        self.procs: list[WorkerProcess] = []

    def worker_argv(self, i: int) -> list[str]:
        c = self.c
        argv = [sys.executable, "-m", "orchestrator.cli", "worker", "--round", c.spec.round, "--storage",
                c.storage_url, "--spec", str(self.spec_file.resolve()), "--results",
                str(c.round_dir.resolve().parent), "--heartbeat-s", f"{c.heartbeat_s:g}", "--stale-after-s",
                f"{c.stale_after_s:g}", "--wait-s", f"{c.wait_s:g}", "--worker-cmd", shlex.join(c.worker_cmd)]
        if self.devices[i] is not None:
            argv += ["--gpu", str(self.devices[i])]
        return argv

    def log_path(self, i: int) -> Path:
        return self.c.paths.workers / f"worker-{i}.log"

    def run(self) -> list[Record]:
        c = self.c
        c.acquire()
        previous = signal.getsignal(signal.SIGTERM)
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread:
            signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
        try:
            c.prepare()
            c.probes = c.stored_probes()
            c.display.round_started(c)
            self.log_path(0).parent.mkdir(parents=True, exist_ok=True)
            for i in range(self.n):
                self.procs.append(start_worker(self.worker_argv(i), self.log_path(i), env=worker_environment()))
                c.display.message(f"worker {i}: pid {self.procs[-1].pid}"
                                  + (f", CUDA_VISIBLE_DEVICES={self.devices[i]}" if self.devices[i] is not None else "")
                                  + f", log {self.log_path(i)}")
            self.watch()
            return c.records
        finally:
            self.stop()
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
            c.release()

    def watch(self) -> None:
        c = self.c
        seen = {r.run_key for r in c.records}
        while True:
            running = [p for p in self.procs if p.proc.poll() is None]
            c.refresh()
            c.probes = c.stored_probes()
            for r in c.records:
                if r.run_key not in seen:
                    seen.add(r.run_key)
                    c.display.run_finished(c, r)
            if not running:
                break
            time.sleep(self.poll_s)
        c.sync_ledger()
        failed = [(i, p) for i, p in enumerate(self.procs) if p.proc.returncode != 0]
        if failed:
            why = "; ".join(f"worker {i} (exit {p.proc.returncode}): {log_tail(self.log_path(i), 1) or '-'}"
                            for i, p in failed)
            if c.plan().runnable:
                raise SchedulerError(f"{len(failed)} of {self.n} workers failed and the round is not finished "
                                     f"({why}); run the same command to resume")
            c.display.message(f"note: {len(failed)} worker(s) failed, the others finished the round ({why})")
        c.display.round_finished(c)

    def stop(self) -> None:
        """SIGTERM the workers still running (they give their units back), SIGKILL those that linger."""
        alive = [p for p in self.procs if p.proc.poll() is None]
        for p in alive:
            p.signal_group(signal.SIGTERM)
        deadline = time.time() + self.c.term_grace_s + TERM_GRACE_S
        for p in alive:
            try:
                p.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()


def pool_devices(n: int, gpu: str | None, device: str) -> list[str | None]:
    """One CUDA_VISIBLE_DEVICES value per worker: from --gpu (comma list), else none on a CPU round, else the devices
    this process sees (its CUDA_VISIBLE_DEVICES), else 0..n-1."""
    if gpu:
        parts = [x.strip() for x in gpu.split(",") if x.strip()]
        if len(parts) < n:
            raise SchedulerError(f"--gpu {gpu}: {n} workers need {n} devices (one each), got {len(parts)}")
        return list(parts[:n])
    if device == "cpu":
        return [None] * n
    visible = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    if visible:
        if len(visible) < n:
            raise SchedulerError(f"--workers {n}: CUDA_VISIBLE_DEVICES names {len(visible)} device(s); give --gpu")
        return list(visible[:n])
    return [str(i) for i in range(n)]
