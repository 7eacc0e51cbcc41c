"""Worker processes: starting one (its own process group, its environment, dying with the scheduler), waiting for it
under a time limit, and killing what an interrupted attempt left behind. Torch-free: torch is only located, never
imported.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from orchestrator.faults import KILL_ENV
from orchestrator.paths import PROGRESS, RUN_CONFIG, WORKER_PID
from orchestrator.round_errors import SchedulerError

WORKER_CMD_ENV = "FSEARCH_WORKER_CMD"
POLL_S = 0.2  # how often the scheduler looks at the worker (exit, progress.json)
TERM_GRACE_S = 5.0  # after SIGTERM to a worker's process group, wait this long before SIGKILL


def worker_command(cmd: str | list[str] | None = None) -> list[str]:
    """The worker command: an argument, else $FSEARCH_WORKER_CMD, else this interpreter's `-m worker`."""
    if isinstance(cmd, list):
        return list(cmd)
    text = cmd or os.environ.get(WORKER_CMD_ENV)
    if text:
        parts = shlex.split(text)
        if not parts:
            raise SchedulerError(f"{WORKER_CMD_ENV} is empty")
        return parts
    return [sys.executable, "-m", "worker"]


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGKILL it when the scheduler dies (no orphaned GPU jobs)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class WorkerProcess:
    """A worker subprocess in its own process group (session); stdout and stderr go to `log_path`."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.argv = argv
        self.log_path = log_path
        parent = os.getpid()

        def preexec() -> None:
            _die_with_parent()
            if os.getppid() != parent:  # the scheduler died before prctl took effect
                os._exit(1)

        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=preexec, env=env, cwd=cwd)
        self.pid = self.proc.pid
        self.started = time.time()
        self.timed_out = False

    def wait(self, time_limit_s: float, poll: Callable[[], None] | None = None, poll_s: float = POLL_S,
             term_grace_s: float = TERM_GRACE_S) -> int:
        """Wait for exit; past the time limit, SIGTERM then SIGKILL the whole group. Returns the exit code
        (negative: killed by that signal)."""
        deadline = self.started + time_limit_s
        while True:
            try:
                code = self.proc.wait(timeout=max(0.0, min(poll_s, deadline - time.time())))
                break
            except subprocess.TimeoutExpired:
                pass
            if poll is not None:
                poll()
            if time.time() >= deadline:
                self.timed_out = True
                self.signal_group(signal.SIGTERM)
                try:
                    code = self.proc.wait(timeout=term_grace_s)
                except subprocess.TimeoutExpired:
                    self.signal_group(signal.SIGKILL)
                    code = self.proc.wait()
                break
        self.signal_group(signal.SIGKILL)  # whatever the worker left in its group (data loaders, grandchildren)
        return code

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def bytecode_cache_dir(env: dict[str, str]) -> str | None:
    """A writable bytecode folder for the workers when torch is installed read-only without bytecode, else None.

    Python caches compiled modules next to their source; where it cannot (a read-only image without .pyc files), each
    worker compiles torch's modules again: about 5 s of every run's start-up in a profile on an H100 machine. The
    worker's environment then points PYTHONPYCACHEPREFIX at a per-user cache, unless the user set it or turned
    bytecode writing off. Finds torch without importing it."""
    if env.get("PYTHONPYCACHEPREFIX") or env.get("PYTHONDONTWRITEBYTECODE"):
        return None
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = Path(next(iter(spec.submodule_search_locations)))
    compiled = pkg / "__pycache__" / f"__init__.{sys.implementation.cache_tag}.pyc"
    if compiled.exists() or os.access(pkg, os.W_OK):
        return None
    cache_home = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache_home) / "fsearch" / "pycache")


def with_checkout_on_path(env: dict[str, str]) -> dict[str, str]:
    """`env` with this checkout first on PYTHONPATH, so that a child `python -m ...` imports this code."""
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def worker_environment(devices: str | None = None) -> dict[str, str]:
    """The worker's environment: ours, minus the scheduler's kill hook, unbuffered output, this checkout importable,
    a writable bytecode cache where torch's install has none (bytecode_cache_dir), and CUDA_VISIBLE_DEVICES when
    devices are given."""
    env = dict(os.environ)
    env.pop(KILL_ENV, None)
    env["PYTHONUNBUFFERED"] = "1"
    with_checkout_on_path(env)
    pycache = bytecode_cache_dir(env)
    if pycache:
        env["PYTHONPYCACHEPREFIX"] = pycache
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return env


def start_worker(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> "WorkerProcess":
    """WorkerProcess, with a worker command that cannot start turned into one clear line."""
    try:
        return WorkerProcess(argv, log_path, env=env)
    except OSError as e:
        raise SchedulerError(f"the worker command cannot start ({shlex.join(argv[:3])} ...): {e.strerror or e}") \
            from None


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat field 22), or None where it is gone or
    unreadable. A pid and its start time name one process: a pid the system gave to another process since does not
    match."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def worker_pid_line(pid: int) -> str:
    """What an attempt's worker.pid holds: the worker's pid and its start time (kill_leftover_worker reads both)."""
    ticks = process_start_ticks(pid)
    return f"{pid} {ticks}\n" if ticks is not None else f"{pid}\n"


def kill_leftover_worker(attempt_dir: Path) -> None:
    """A worker of an interrupted attempt that is somehow still alive: kill its process group before the run starts
    again. The worker is the process worker.pid names if it started when the file says (a warm worker's process, which
    runs other runs after this one, is found this way too); for a file with a pid alone, the process must also have
    this attempt's run file on its command line."""
    try:
        fields = (attempt_dir / WORKER_PID).read_text().split()
        pid = int(fields[0])
        ticks = int(fields[1]) if len(fields) > 1 else None
    except (OSError, ValueError, IndexError):
        return
    if ticks is not None:
        ours = process_start_ticks(pid) == ticks
    else:
        try:
            ours = str(attempt_dir / RUN_CONFIG) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            ours = False
    if ours:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def read_progress(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / PROGRESS).read_text())
    except (OSError, ValueError):
        return None


class WarmWorker:
    """One worker process that runs a round's runs one after another (`<worker command> --serve`, spec
    `defaults.worker: warm`), so that imports, compiled graphs and autotuning are paid once per round instead of once
    per run. Each run still gets a fresh model, optimizer, data streams and RNG seeds (worker.run.run, as a fresh
    process runs it), its own log file and its own time limit. The process is replaced after any run that does not
    end well (crash, out of memory, time limit: a fresh CUDA context for the next run) or that left GPU memory
    held (worker/serve.py says so on its status line), and dies with the scheduler."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.argv = list(argv) + ["--serve"]
        self.log_path = Path(log_path)  # what the process prints outside its runs (start-up)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.started_processes = 0
        self.retiring = False
        self._buf = b""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self) -> None:
        parent = os.getpid()

        def preexec() -> None:
            _die_with_parent()
            if os.getppid() != parent:
                os._exit(1)

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                             start_new_session=True, preexec_fn=preexec, env=self.env)
        except OSError as e:
            raise SchedulerError(f"the worker command cannot start ({shlex.join(self.argv[:3])} ...): "
                                 f"{e.strerror or e}") from None
        self._buf = b""
        self.retiring = False
        self.started_processes += 1

    def start(self, run_file: Path, log_path: Path) -> "WarmRun":
        """Hand one run to the process (starting one if none is alive); wait on the returned handle."""
        if not self.alive():
            self._spawn()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{run_file}\t{log_path}\n".encode())
            self.proc.stdin.flush()
        except BrokenPipeError:  # it died between runs: start another and hand it the run
            self.retire()
            return self.start(run_file, log_path)
        return WarmRun(self)

    def read_status(self, timeout_s: float) -> int | None:
        """The exit code the process reports for its current run, if one arrives within timeout_s."""
        import select

        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.time() + timeout_s
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line.startswith(b"fsearch-exit "):  # worker/serve.py's status line; other output is not one
                    try:
                        code = int(line.split()[1])
                    except (IndexError, ValueError):
                        continue
                    self.retiring = line.split()[2:] == [b"retire"]  # the process ends after this run
                    return code
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:  # the process ended without reporting
                raise EOFError
            self._buf += chunk

    def signal_group(self, sig: int) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def retire(self, grace_s: float = 10.0) -> int | None:
        """Let the process go (it exits by itself after a failed run); kill its group if it lingers. Its exit code."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        try:
            code = proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it left in its group
        except (ProcessLookupError, PermissionError):
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                f and f.close()
            except OSError:
                pass
        return code

    def close(self) -> None:
        """End of the round: close its input (it exits when its current run is done) and make sure it is gone."""
        if self.proc is None:
            return
        try:
            self.proc.stdin and self.proc.stdin.close()
        except OSError:
            pass
        self.retire(grace_s=TERM_GRACE_S)


class WarmRun:
    """One run handed to a WarmWorker, waited on as a WorkerProcess is (pid, wait, timed_out, kill)."""

    def __init__(self, worker: WarmWorker):
        assert worker.proc is not None
        self.worker = worker
        self.pid = worker.proc.pid
        self.started = time.time()
        self.timed_out = False

    def wait(self, time_limit_s: float, poll: Callable[[], None] | None = None, poll_s: float = POLL_S,
             term_grace_s: float = TERM_GRACE_S) -> int:
        """The run's exit code, as the worker reports it; past the time limit the process group is stopped (SIGTERM,
        then SIGKILL) and the code is the signal's, negative, as for a fresh worker."""
        w = self.worker
        deadline = self.started + time_limit_s
        while True:
            try:
                code = w.read_status(max(0.0, min(poll_s, deadline - time.time())))
            except EOFError:
                died = w.retire()
                return died if died not in (None, 0) else 1  # it ended without reporting: a crash
            if code is not None:
                if code != 0 or w.retiring:  # the process exits after this run: the next run starts a fresh one
                    w.retire()
                return code
            if poll is not None:
                poll()
            if time.time() >= deadline:
                self.timed_out = True
                w.signal_group(signal.SIGTERM)
                assert w.proc is not None
                try:
                    w.proc.wait(timeout=term_grace_s)
                except subprocess.TimeoutExpired:
                    w.signal_group(signal.SIGKILL)
                code = w.retire()
                return code if code is not None else -signal.SIGKILL

    def kill(self) -> None:
        self.worker.signal_group(signal.SIGKILL)
        self.worker.retire()
