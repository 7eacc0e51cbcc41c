"""Run untrusted Python (model-written MBPP solutions) in a child process with limits. Torch-free.

`run_python(source, limits)` runs `source` as a script in a fresh temporary directory and returns a
`SandboxResult`; `run_tests(program, tests, setup, limits)` runs a candidate program and then each test
statement on its own, and reports which tests passed.

What is guaranteed (Linux; each layer is tested in tests/tasks/test_sandbox.py):
- the child runs in its own session / process group, with cwd, HOME and TMPDIR set to a temporary directory
  that is deleted afterwards, stdin from /dev/null, stdout/stderr written to files there and read back up
  to `limits.output_bytes`, an environment reduced to PATH/LANG/HOME/TMPDIR, and Python's isolated mode (-I);
- CPU time is capped by RLIMIT_CPU (SIGXCPU at `cpu_s`, SIGKILL one second later), address space by
  RLIMIT_AS (`memory_mb`: allocations beyond it raise MemoryError or kill the child), written file size by
  RLIMIT_FSIZE, core dumps are off;
- wall time is capped at `wall_s`: the whole process group is then killed with SIGKILL; after a normal exit
  any process left in the group is killed too;
- network: Python-level socket creation, connection and name resolution raise OSError (a prelude runs before
  the code); in addition, where the host allows it (`unshare -n` as root, or `unshare -rn` through an
  unprivileged user namespace), the child runs in a fresh network namespace with no usable interface, so
  even code that bypasses the prelude (ctypes, a subprocess) cannot reach any host. `SandboxResult
  .network_isolated` says whether that namespace was in effect;
- the limits are set by the child itself, in the first lines it runs, before any of the code (no preexec_fn,
  which can deadlock a multi-threaded parent such as the training worker); the parent's own limits, working
  directory, process group and sockets are never touched.

What is NOT guaranteed: this is a fence against accidents (infinite loops, runaway allocation, stray network
calls, files written in the wrong place), not a security boundary against adversarial code. The child runs
as the same user and can read any file that user can read; a process that starts a new session of its own
escapes the group kill (RLIMIT_CPU still ends it); without a network namespace, code that bypasses the
Python prelude can open sockets.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not a failure of the code under test)."""


class Limits(BaseModel):
    """Resource limits of one sandboxed run (the defaults used for MBPP scoring live in tasks/real/mbpp.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    wall_s: float = Field(10.0, gt=0)
    cpu_s: int = Field(5, ge=1)
    memory_mb: int = Field(1024, ge=64)
    file_mb: int = Field(16, ge=1)
    output_bytes: int = Field(65536, ge=1024)
    network_namespace: bool = True  # use a fresh network namespace where the host allows it
    block_python_sockets: bool = True  # the socket prelude


@dataclass(frozen=True)
class SandboxResult:
    returncode: int  # negative: killed by that signal (subprocess convention)
    stdout: str
    stderr: str
    timed_out: bool  # the wall limit was hit and the process group killed
    wall_s: float
    network_isolated: bool
    files: dict[str, str] = field(default_factory=dict)  # files read back from the working directory

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None


# Runs first inside the child: its own resource limits (argv 2-4: CPU seconds, address-space and file-size bytes).
_LIMITS = r'''
import resource as _resource, sys as _sys
_cpu, _mem, _fsize = (int(x) for x in _sys.argv[2:5])
_resource.setrlimit(_resource.RLIMIT_CPU, (_cpu, _cpu + 1))
_resource.setrlimit(_resource.RLIMIT_AS, (_mem, _mem))
_resource.setrlimit(_resource.RLIMIT_FSIZE, (_fsize, _fsize))
_resource.setrlimit(_resource.RLIMIT_CORE, (0, 0))
del _resource, _sys, _cpu, _mem, _fsize
'''

# Then: makes Python-level networking fail.
_PRELUDE = r'''
import errno as _errno, socket as _socket_mod, _socket

def _fsearch_no_network(*args, **kwargs):
    raise OSError(_errno.EACCES, "network access is disabled in the fsearch sandbox")

class _FsearchBlockedSocket(_socket.socket):
    def __init__(self, *args, **kwargs):
        _fsearch_no_network()

for _mod in (_socket_mod, _socket):
    _mod.socket = _mod.SocketType = _FsearchBlockedSocket
    for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                  "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _fsearch_no_network)
del _mod, _name
'''

_RUNNER = r'''
import sys
__fsearch_src = open(sys.argv[1], encoding="utf-8").read()
del sys
exec(compile(__fsearch_src, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


@functools.lru_cache(maxsize=None)
def _unshare_prefix() -> tuple[str, ...] | None:
    """The command prefix that gives a fresh network namespace on this host, or None."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    for prefix in ((exe, "-n"), (exe, "-r", "-n")):
        try:
            r = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return prefix
    return None


def network_namespace_available() -> bool:
    return _unshare_prefix() is not None


def _read_capped(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(source: str, limits: Limits | None = None, *, files: dict[str, str] | None = None,
               collect: tuple[str, ...] = ()) -> SandboxResult:
    """Run `source` as a Python script under `limits`; `files` are written into the working directory first and
    the files named in `collect` are read back (up to `limits.output_bytes` each) after the run."""
    limits = limits or Limits()
    prefix = _unshare_prefix() if limits.network_namespace else None
    with tempfile.TemporaryDirectory(prefix="fsearch-sandbox-") as tmp:
        work = Path(tmp)
        (work / "main.py").write_text(source, encoding="utf-8")
        runner = _LIMITS + (_PRELUDE if limits.block_python_sockets else "") + _RUNNER
        (work / "_runner.py").write_text(runner, encoding="utf-8")
        for name, text in (files or {}).items():
            (work / name).write_text(text, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [*(prefix or ()), sys.executable, "-I", "_runner.py", "main.py", str(limits.cpu_s),
               str(limits.memory_mb * 1024 * 1024), str(limits.file_mb * 1024 * 1024)]
        t0 = time.monotonic()
        with open(work / "_stdout", "wb") as out, open(work / "_stderr", "wb") as err:
            try:
                proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True)
            except OSError as e:
                raise SandboxError(f"could not start the sandboxed interpreter: {e}") from e
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                proc.wait()
            finally:
                _kill_group(proc.pid)  # anything the child left behind in its group
        wall = time.monotonic() - t0
        got = {name: _read_capped(work / name, limits.output_bytes) for name in collect if (work / name).is_file()}
        return SandboxResult(returncode=proc.returncode, stdout=_read_capped(work / "_stdout", limits.output_bytes),
                             stderr=_read_capped(work / "_stderr", limits.output_bytes), timed_out=timed_out,
                             wall_s=wall, network_isolated=prefix is not None, files=got)


# ---------------------------------------------------------------------------------------------------------------
# test harness: load the candidate once, then run each test statement on its own

_HARNESS = r'''
import json

def _longest_compilable_prefix(src):
    lines = src.split("\n")
    for end in range(len(lines), 0, -1):
        try:
            return compile("\n".join(lines[:end]), "candidate.py", "exec")
        except Exception:
            continue
    return compile("", "candidate.py", "exec")

def _main():
    spec = json.load(open("_job.json", encoding="utf-8"))
    out = open("_results.jsonl", "w", encoding="utf-8", buffering=1)
    ns = {"__name__": "__candidate__"}
    try:
        code = _longest_compilable_prefix(spec["program"])
        exec(compile(spec["setup"], "setup.py", "exec"), ns)
        exec(code, ns)
        out.write(json.dumps({"loaded": True}) + "\n")
    except BaseException as e:
        out.write(json.dumps({"loaded": False, "error": type(e).__name__ + ": " + str(e)[:200]}) + "\n")
        return
    for i, test in enumerate(spec["tests"]):
        try:
            exec(compile(test, "test_%d.py" % i, "exec"), ns)
            ok, error = True, None
        except BaseException as e:
            ok, error = False, type(e).__name__
        out.write(json.dumps({"test": i, "ok": ok, "error": error}) + "\n")

_main()
'''


@dataclass(frozen=True)
class TestReport:
    loaded: bool  # the candidate program (and the setup code) ran without raising
    passed: tuple[bool, ...]  # one entry per test, in order; tests that never ran count as failed
    error: str | None
    result: SandboxResult

    @property
    def pass_at_1(self) -> float:
        return float(bool(self.passed) and all(self.passed))

    @property
    def test_pass_frac(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


def run_tests(program: str, tests: list[str], setup: str = "", limits: Limits | None = None) -> TestReport:
    """Execute `setup`, then `program` (if it does not compile, its longest compilable prefix of whole lines), then
    each statement of `tests` separately. Any exception, exit, crash or limit counts as a failure."""
    job = json.dumps({"program": program, "setup": setup or "", "tests": list(tests)})
    res = run_python(_HARNESS, limits, files={"_job.json": job}, collect=("_results.jsonl",))
    passed = [False] * len(tests)
    loaded, error = False, None
    for line in res.files.get("_results.jsonl", "").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loaded" in rec:
            loaded, error = bool(rec["loaded"]), rec.get("error")
        elif isinstance(rec.get("test"), int) and 0 <= rec["test"] < len(tests):
            passed[rec["test"]] = rec.get("ok") is True
    if res.timed_out:
        error = error or "wall time limit exceeded"
    elif res.returncode != 0 and error is None:
        error = f"killed by signal {res.signal}" if res.signal else f"exit status {res.returncode}"
    return TestReport(loaded=loaded, passed=tuple(passed), error=error, result=res)
