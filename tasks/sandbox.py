"""Run untrusted Python (model-written MBPP solutions) behind a namespace boundary. Torch-free.

`run_python(source, limits)` runs `source` as a script and returns a `SandboxResult`; `run_tests(program, tests,
setup, limits)` runs a candidate program and then each test statement on its own, and reports which passed.
`unavailable_reason()` says, in one line, why this machine cannot provide the boundary (None when it can).

Mode `enforced` (the default) runs the interpreter under bubblewrap (`bwrap`, Debian/Ubuntu package `bubblewrap`;
`FSEARCH_BWRAP` names another binary, else PATH). What it guarantees (each class tested with an adversarial
program in tests/tasks/test_sandbox_escapes.py):
- processes: new PID, mount, network, IPC, UTS, cgroup and user namespaces; the program sees only its own
  processes, so it cannot signal, trace or wait for anything outside (its caller included). It runs as uid/gid
  65534 with no capabilities and cannot create further user namespaces. When the caller is root, bwrap itself is
  started as uid 65534, so no process of the sandbox is root outside it either (RLIMIT_NPROC binds).
- files: the root is an empty read-only tmpfs holding /usr, the /bin and /lib links and the interpreter's
  prefix read-only, a fresh /proc, a minimal /dev, and a private writable scratch tmpfs at /tmp (also cwd, HOME
  and TMPDIR) capped at `disk_mb`; /dev/shm is a tmpfs of 8 MiB. Nothing else of the host (no /etc, /home,
  /root, /work, the caller's /tmp) is visible. The program and its results travel through anonymous files and
  pipes, so nothing is written on the host: nothing is left behind, whatever the outcome, caller killed included.
- network: an empty network namespace (a private loopback only): no host, local or remote, can be reached by any
  means (Python, ctypes, a subprocess); abstract unix sockets of the host are in the host namespace, unreachable.
- bounds, set by the runner before the program's first line: RLIMIT_NPROC `processes` (threads count),
  RLIMIT_AS `memory_mb` per process, RLIMIT_CPU `cpu_s` per process, RLIMIT_FSIZE `file_mb`, RLIMIT_NOFILE
  `open_files`, no core files; wall time `wall_s`, after which bwrap is killed and with it (die-with-parent, PID
  namespace) every process of the sandbox; when the program's main process ends, the PID namespace ends too.
- environment: cleared; PATH, LANG, HOME, TMPDIR, PYTHONHASHSEED, PYTHONDONTWRITEBYTECODE only; Python runs
  isolated (-I) without site-packages (-S): the standard library only. Stdin is empty.

Limits of the boundary: total memory is bounded by the counts above (processes x memory_mb, tmpfs sizes, open
files x file_mb for anonymous files), not by a cgroup, so a hostile program can hold that much of the machine's
memory until its wall limit. Kernel objects such as SysV IPC segments live until the namespace ends. No seccomp
filter: the kernel's full system-call surface of an unprivileged user namespace is reachable.
Out of scope: kernel and bubblewrap exploits, hardware side channels (Spectre-class, timing, cache), denial of
service through CPU contention up to the bounds, and a program that misreports its own tests (it runs in the
harness's process, so it can forge its results: that is a scoring matter, not an escape).

Mode `unsafe` (spec `sandbox: unsafe`, recorded in every record) is the old fence: a child process in its own
session, same user, a host temporary folder, the same rlimits except RLIMIT_NPROC, and a Python-level socket
block. It stops accidents (loops, allocation, stray writes in cwd), not adversaries.
"""
from __future__ import annotations

import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SandboxMode = Literal["enforced", "unsafe"]
SANDBOX_MODES: tuple[str, ...] = ("enforced", "unsafe")
SANDBOX_UID = 65534  # "nobody": the uid inside the sandbox, and outside it when the caller is root
SCRATCH = "/tmp"  # the private tmpfs inside the sandbox
SHM_BYTES = 8 * 1024 * 1024
_DRAIN_S = 5.0  # how long pipes may stay open after the sandbox was killed (a held pipe must not hang the caller)


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not a failure of the code under test)."""


class SandboxUnavailable(SandboxError):
    """This machine cannot provide the boundary; the message is one line saying what to install or enable."""


class Limits(BaseModel):
    """Resource limits of one sandboxed run (the defaults used for MBPP scoring live in tasks/real/mbpp.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    wall_s: float = Field(10.0, gt=0)
    cpu_s: int = Field(5, ge=1)
    memory_mb: int = Field(1024, ge=64)  # address space per process
    file_mb: int = Field(16, ge=1)  # largest file a process may write
    disk_mb: int = Field(64, ge=1)  # the scratch tmpfs (enforced mode)
    processes: int = Field(8, ge=2)  # processes and threads of the sandbox (enforced mode), its runner included
    open_files: int = Field(64, ge=16)
    output_bytes: int = Field(65536, ge=1024)  # stdout and stderr are each cut to this
    block_python_sockets: bool = True  # the Python-level socket prelude (the network namespace holds without it)


@dataclass(frozen=True)
class SandboxResult:
    returncode: int  # negative: killed by that signal (subprocess convention)
    stdout: str
    stderr: str
    timed_out: bool  # the wall limit was hit and the sandbox killed
    wall_s: float
    mode: str  # "enforced" or "unsafe"
    results: str = ""  # what the program wrote to its results channel (run_tests' harness)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None


# The runner: reads the job from an inherited anonymous file, sets the limits, then runs the source. argv: job fd,
# results fd, CPU s, address-space bytes, file bytes, processes (0: unbounded), open files, socket block (0/1).
_RUNNER = r'''
import os as _os, resource as _r, sys as _sys
_a = [int(x) for x in _sys.argv[1:9]]
_job = b""
while True:
    _chunk = _os.read(_a[0], 1 << 20)
    if not _chunk:
        break
    _job += _chunk
_os.close(_a[0])
_r.setrlimit(_r.RLIMIT_CPU, (_a[2], _a[2] + 1))
_r.setrlimit(_r.RLIMIT_AS, (_a[3], _a[3]))
_r.setrlimit(_r.RLIMIT_FSIZE, (_a[4], _a[4]))
if _a[5]:
    _r.setrlimit(_r.RLIMIT_NPROC, (_a[5], _a[5]))
_r.setrlimit(_r.RLIMIT_NOFILE, (_a[6], _a[6]))
_r.setrlimit(_r.RLIMIT_CORE, (0, 0))
if _a[7]:
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
import json as _json
_job = _json.loads(_job.decode("utf-8"))
_g = {"__name__": "__main__", "__builtins__": __builtins__, "__fsearch_data__": _job["data"],
      "__fsearch_results__": _os.fdopen(_a[1], "w", encoding="utf-8", buffering=1)}
_src = _job["source"]
del _os, _r, _sys, _a, _job, _json
exec(compile(_src, "main.py", "exec"), _g)
'''


# ---------------------------------------------------------------------------------------------------------------
# what the machine provides

def _bwrap_path() -> tuple[str | None, str]:
    """(bwrap binary or None, where it was looked for)."""
    named = os.environ.get("FSEARCH_BWRAP")
    if named:
        return (named if os.path.isfile(named) and os.access(named, os.X_OK) else None), f"FSEARCH_BWRAP={named}"
    return shutil.which("bwrap"), "PATH"


def _interpreters() -> list[tuple[str, str]]:
    """(interpreter, its prefix) to try, the caller's own first; the first one the sandbox can run is used."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    out = [(exe, os.path.realpath(sys.base_prefix))]
    for path, prefix in (("/usr/bin/python3", "/usr"), ("/usr/local/bin/python3", "/usr/local")):
        if os.path.isfile(path) and os.path.realpath(path) != exe:
            out.append((os.path.realpath(path), prefix))
    return out


def _root_entries() -> list[str]:
    """bwrap arguments that give the sandbox the host's /usr and its /bin, /lib... (links on merged-/usr hosts)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    return args


def _bwrap_argv(bwrap: str, python: str, prefix: str, limits: Limits) -> list[str]:
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID),
            "--gid", str(SANDBOX_UID), "--hostname", "sandbox", "--die-with-parent", "--new-session",
            *_root_entries()]
    if not (prefix == "/usr" or prefix.startswith("/usr/")):
        argv += ["--ro-bind", prefix, prefix]
    if not python.startswith(("/usr/", prefix.rstrip("/") + "/")):
        argv += ["--ro-bind", python, python]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm",
             "--size", str(limits.disk_mb * 1024 * 1024), "--tmpfs", SCRATCH, "--chmod", "0700", SCRATCH,
             "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", SCRATCH, "--clearenv"]
    for key, value in _env(SCRATCH).items():
        argv += ["--setenv", key, value]
    return argv


def _env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home, "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1"}


def _drop_to() -> dict:
    """Popen arguments that start bwrap as the unprivileged uid when the caller is root (done in the child between
    fork and exec by the C code of subprocess: safe in a multi-threaded caller)."""
    if os.geteuid() != 0:
        return {}
    return {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []}


@functools.lru_cache(maxsize=None)
def _boundary() -> tuple[str, str, str] | str:
    """(bwrap, interpreter, prefix) that work on this machine, or the one-line reason why none does."""
    if not sys.platform.startswith("linux"):
        return f"the MBPP sandbox needs Linux namespaces (this is {sys.platform}); `sandbox: unsafe` runs without it"
    bwrap, where = _bwrap_path()
    if bwrap is None:
        return (f"the MBPP sandbox needs bubblewrap, not found ({where}): install it (apt-get install bubblewrap) or "
                f"set FSEARCH_BWRAP to a bwrap binary; `sandbox: unsafe` in the spec defaults runs without it")
    failure = ""
    for python, prefix in _interpreters():
        try:
            res = _run(_bwrap_argv(bwrap, python, prefix, _PROBE_LIMITS), python, "print(6 * 7)", "",
                       _PROBE_LIMITS, "enforced", cwd=None)
        except SandboxError as e:
            failure = str(e)
            continue
        if res.ok and res.stdout.strip() == "42":
            return bwrap, python, prefix
        failure = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
    return (f"bubblewrap ({bwrap}) cannot set up the MBPP sandbox here ({failure}): enable unprivileged user "
            f"namespaces (sysctl user.max_user_namespaces>0 and kernel.unprivileged_userns_clone=1 where it exists; "
            f"in a container, a seccomp/AppArmor profile that allows them), and keep bwrap and the interpreter "
            f"readable by uid {SANDBOX_UID}; `sandbox: unsafe` in the spec defaults runs without it")


_PROBE_LIMITS = Limits(wall_s=20, cpu_s=5, memory_mb=256)


def unavailable_reason() -> str | None:
    """None when the enforced sandbox works on this machine, else one line: what to install or enable."""
    found = _boundary()
    return found if isinstance(found, str) else None


def require_boundary() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise SandboxUnavailable(reason)


# ---------------------------------------------------------------------------------------------------------------
# running

def _job_file(source: str, data: str) -> int:
    fd = os.memfd_create("fsearch-sandbox-job", os.MFD_CLOEXEC)
    payload = json.dumps({"source": source, "data": data}).encode("utf-8")
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _run(argv_prefix: list[str], python: str, source: str, data: str, limits: Limits, mode: str,
         cwd: str | None) -> SandboxResult:
    job = _job_file(source, data)
    res_r, res_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    args = [str(job), str(res_w), str(limits.cpu_s), str(limits.memory_mb * 1024 * 1024),
            str(limits.file_mb * 1024 * 1024), str(limits.processes if mode == "enforced" else 0),
            str(limits.open_files), str(int(limits.block_python_sockets))]
    cmd = [*argv_prefix, python, "-I", "-S", "-c", _RUNNER, *args]
    t0 = time.monotonic()
    try:
        try:
            if mode == "enforced":
                proc = subprocess.Popen(cmd, env={}, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                                        pass_fds=(job, res_w), start_new_session=True, **_drop_to())
            else:
                proc = subprocess.Popen(cmd, cwd=cwd, env=_env(cwd or "/"), stdin=subprocess.DEVNULL, stdout=out_w,
                                        stderr=err_w, pass_fds=(job, res_w), start_new_session=True)
        except OSError as e:
            raise SandboxError(f"could not start the sandboxed interpreter: {e}") from e
    finally:
        for fd in (job, res_w, out_w, err_w):
            os.close(fd)
    try:
        texts, timed_out = _collect(proc, {"stdout": out_r, "stderr": err_r, "results": res_r}, limits, mode, t0)
    finally:
        _kill(proc, mode)
        proc.wait()
        for fd in (out_r, err_r, res_r):
            os.close(fd)
    rc = proc.returncode
    if mode == "enforced" and not timed_out and 128 < rc < 128 + 65:
        rc = -(rc - 128)  # bwrap reports a command killed by signal N as 128 + N
    return SandboxResult(returncode=rc, stdout=texts["stdout"], stderr=texts["stderr"], timed_out=timed_out,
                         wall_s=time.monotonic() - t0, mode=mode, results=texts["results"])


def _kill(proc: subprocess.Popen, mode: str) -> None:
    """Enforced: SIGKILL to bwrap, whose death kills the PID namespace (die-with-parent). Unsafe: the session."""
    try:
        if mode == "enforced":
            proc.kill()
        else:
            os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(proc: subprocess.Popen, fds: dict[str, int], limits: Limits, mode: str,
             t0: float) -> tuple[dict[str, str], bool]:
    """Read every pipe to its end (each cut to output_bytes, the rest drained) until the wall limit."""
    bufs = {name: bytearray() for name in fds}
    sel = selectors.DefaultSelector()
    for name, fd in fds.items():
        sel.register(fd, selectors.EVENT_READ, name)
    deadline = t0 + limits.wall_s
    timed_out, ended_at = False, None
    try:
        while sel.get_map():
            now = time.monotonic()
            if ended_at is None and proc.poll() is not None:
                ended_at = now
                _kill(proc, mode)  # anything it left behind (enforced: already gone with the namespace)
            if ended_at is None and now >= deadline:
                timed_out, ended_at = True, now
                _kill(proc, mode)
            if ended_at is not None and now - ended_at > _DRAIN_S:
                break
            for key, _ in sel.select(timeout=0.05):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.data]
                if len(buf) < limits.output_bytes:
                    buf += chunk[: limits.output_bytes - len(buf)]
    finally:
        sel.close()
    return {name: bytes(b).decode("utf-8", errors="replace") for name, b in bufs.items()}, timed_out


def run_python(source: str, limits: Limits | None = None, *, mode: SandboxMode = "enforced",
               data: str = "") -> SandboxResult:
    """Run `source` as a Python script under `limits`. `data` is visible to it as `__fsearch_data__`; what it writes
    to `__fsearch_results__` comes back as `SandboxResult.results`. Enforced mode raises SandboxUnavailable when
    this machine cannot provide the boundary."""
    limits = limits or Limits()
    if mode == "enforced":
        found = _boundary()
        if isinstance(found, str):
            raise SandboxUnavailable(found)
        bwrap, python, prefix = found
        return _run(_bwrap_argv(bwrap, python, prefix, limits), python, source, data, limits, mode, cwd=None)
    if mode != "unsafe":
        raise ValueError(f"sandbox mode must be one of {', '.join(SANDBOX_MODES)}, got {mode!r}")
    with tempfile.TemporaryDirectory(prefix="fsearch-sandbox-") as tmp:
        return _run([], sys.executable, source, data, limits, mode, cwd=tmp)


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

def _main(spec, out):
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

_main(json.loads(__fsearch_data__), __fsearch_results__)
'''


@dataclass(frozen=True)
class TestReport:
    __test__ = False  # not a pytest class

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


def run_tests(program: str, tests: list[str], setup: str = "", limits: Limits | None = None, *,
              mode: SandboxMode = "enforced") -> TestReport:
    """Execute `setup`, then `program` (if it does not compile, its longest compilable prefix of whole lines), then
    each statement of `tests` separately. Any exception, exit, crash or limit counts as a failure."""
    job = json.dumps({"program": program, "setup": setup or "", "tests": list(tests)})
    res = run_python(_HARNESS, limits, mode=mode, data=job)
    passed = [False] * len(tests)
    loaded, error = False, None
    for line in res.results.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
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
