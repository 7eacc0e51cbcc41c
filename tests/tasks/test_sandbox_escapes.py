"""Adversarial programs against the enforced MBPP sandbox: each tries one class of escape and fails, and the caller
(this test process, its sentinel processes, its files and environment) survives every one."""
from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from tasks.sandbox import Limits, run_python, run_tests, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

FAST = Limits(wall_s=8, cpu_s=3, memory_mb=256)
GOOD = "def add(a, b):\n    return a + b\n"


def leftovers() -> set[str]:
    return set(glob.glob("/tmp/fsearch-sandbox-*"))


def processes_with(marker: str) -> list[int]:
    found = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(cmdline.split("/")[2]))
        except OSError:
            continue
    return [p for p in found if p != os.getpid()]


@pytest.fixture(autouse=True)
def caller_survives():
    """Every case: a sentinel process outside stays alive, no scratch folder is left, and a correct solution still
    passes afterwards."""
    before = leftovers()
    sentinel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield sentinel
    try:
        assert sentinel.poll() is None, "the sentinel process outside the sandbox was killed"
    finally:
        sentinel.kill()
        sentinel.wait()
    assert leftovers() <= before
    assert run_tests(GOOD, ["assert add(1, 2) == 3"], limits=FAST).pass_at_1 == 1.0


def run(src: str, limits: Limits = FAST, **kw):
    return run_python(textwrap.dedent(src), limits, **kw)


def test_cannot_kill_its_caller():
    res = run("""
        import os, signal
        for pid in {os.getppid(), 1}:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError as e:
                print('refused', pid, e.errno)
        print('ppid', os.getppid())
    """)
    assert res.mode == "enforced"  # this process is alive to read the result


def test_cannot_signal_any_outside_process(caller_survives):
    sentinel = caller_survives
    res = run(f"""
        import os, signal
        print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
        for pid in ({sentinel.pid}, {os.getpid()}):
            try:
                os.kill(pid, 0)
                print('SEES', pid)
            except OSError:
                pass
        os.kill(-1, signal.SIGKILL)  # every process it may signal: only its own
    """)
    assert "SEES" not in res.stdout
    assert max(eval(res.stdout.splitlines()[0])) < 10  # it sees only a handful of its own PIDs


def test_cannot_read_a_secret_file_outside(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-" + uuid.uuid4().hex)
    secret.chmod(0o644)
    res = run(f"""
        import os
        for path in ({str(secret)!r}, '/proc/{os.getpid()}/environ', '/etc/passwd', '/root/.bashrc',
                     {os.getcwd() + '/README.md'!r}):
            try:
                print(open(path).read()[:200])
            except OSError as e:
                print('no', path, e.strerror)
        print(os.listdir('/'))
    """)
    assert secret.read_text() not in res.stdout and "TOPSECRET" not in res.stdout
    assert res.stdout.count("no ") == 5


def test_cannot_write_outside_the_scratch_folder(tmp_path):
    target = tmp_path / "planted"
    name = f"/tmp/fsearch-escape-{uuid.uuid4().hex}"
    res = run(f"""
        for path in ({str(target)!r}, {name!r}, '/usr/planted', '/planted', '/dev/planted', '/proc/planted'):
            try:
                open(path, 'w').write('x')
                print('wrote', path)
            except OSError as e:
                print('no', path, e.strerror)
    """)
    assert res.ok, res.stderr
    assert not target.exists() and not os.path.exists(name) and not os.path.exists("/usr/planted")
    assert f"wrote {name}" in res.stdout  # its own private /tmp, gone with the sandbox


def test_fork_bomb_is_bounded_and_fails():
    t0 = time.monotonic()
    rep = run_tests("import os\ndef bomb():\n    while True:\n        os.fork()\n", ["bomb()", "assert True"],
                    limits=Limits(wall_s=5, cpu_s=3, memory_mb=256))
    assert rep.pass_at_1 == 0.0 and rep.passed[0] is False
    assert time.monotonic() - t0 < 20
    probe = subprocess.run([sys.executable, "-c", "print('fine')"], capture_output=True, text=True, timeout=30)
    assert probe.stdout.strip() == "fine"  # the machine can still start processes


def test_cannot_fill_the_disk():
    free = os.statvfs("/tmp").f_bavail * os.statvfs("/tmp").f_frsize
    res = run("""
        import os
        block = b'x' * (1 << 20)
        for path in ('/tmp/fill', '/dev/shm/fill'):
            written = 0
            try:
                with open(path, 'wb') as f:
                    for _ in range(4096):
                        f.write(block)
                        written += 1
            except OSError as e:
                print('stopped', path, written, e.strerror)
            try:
                os.remove(path)
            except OSError:
                pass
        n = 0
        try:
            while True:  # many files, each under the file-size limit
                with open('/tmp/f%d' % n, 'wb') as f:
                    f.write(block * 8)
                n += 1
        except OSError as e:
            print('stopped files', n, e.strerror)
    """, Limits(wall_s=20, cpu_s=10, memory_mb=256, disk_mb=32, file_mb=16))
    lines = [line.split() for line in res.stdout.splitlines()]
    assert len(lines) == 3, res.stdout + res.stderr
    assert int(lines[0][2]) <= 32 and int(lines[1][2]) <= 8 and int(lines[2][2]) <= 4
    assert os.statvfs("/tmp").f_bavail * os.statvfs("/tmp").f_frsize > free - (64 << 20)


def test_cannot_read_the_callers_environment(monkeypatch):
    secret = "ENVSECRET-" + uuid.uuid4().hex
    monkeypatch.setenv("FSEARCH_TEST_SECRET", secret)
    res = run(f"""
        import os
        print(dict(os.environ))
        for path in ('/proc/1/environ', '/proc/self/environ', '/proc/{os.getpid()}/environ'):
            try:
                print(open(path, 'rb').read())
            except OSError as e:
                print('no', path)
    """)
    assert secret not in res.stdout and "FSEARCH_TEST_SECRET" not in res.stdout


def test_cannot_open_a_connection_by_any_route():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        # the Python-level socket block is off: only the network namespace stands in the way
        direct = (f"import socket\ns = socket.socket()\ns.settimeout(2)\n"
                  f"try:\n    s.connect(('127.0.0.1', {port}))\n    print('CONNECTED')\n"
                  f"except OSError as e:\n    print('refused', e.errno)\n")
        res = run(f"""
            import ctypes, socket, struct, subprocess, sys
            exec({direct!r})
            out = subprocess.run([sys.executable, '-c', {direct!r}], capture_output=True, text=True)
            print('sub', out.stdout.strip())
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.socket(2, 1, 0)
            addr = struct.pack('!HH4s8x', 2, {port}, bytes([127, 0, 0, 1]))
            addr = struct.pack('=H', 2) + addr[2:]
            rc = libc.connect(fd, addr, len(addr))
            print('CONNECTED ctypes' if rc == 0 else 'refused ctypes %d' % ctypes.get_errno())
            for host in ('8.8.8.8', '10.0.0.1'):
                try:
                    socket.create_connection((host, 53), timeout=1)
                    print('CONNECTED', host)
                except OSError as e:
                    print('refused', host, e.errno)
        """, Limits(wall_s=15, cpu_s=5, memory_mb=256, block_python_sockets=False))
        assert "CONNECTED" not in res.stdout and res.stdout.count("refused") == 5, res.stdout + res.stderr
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever reached the caller's port
    finally:
        server.close()


def test_nothing_survives_the_wall_limit():
    marker = f"fsearch-escape-{uuid.uuid4().hex}"
    res = run(f"""
        import os, subprocess, sys, time
        code = "import time; time.sleep(3)  # {marker}"
        if os.fork() == 0:  # a detached grandchild in a session of its own
            os.setsid()
            subprocess.Popen([sys.executable, '-c', code], start_new_session=True)
            os._exit(0)
        time.sleep(60)
    """, Limits(wall_s=1.5, cpu_s=5, memory_mb=256))
    assert res.timed_out and res.signal == signal.SIGKILL
    assert processes_with(marker) == []


def test_nothing_survives_the_caller_being_killed(tmp_path):
    marker = f"fsearch-escape-{uuid.uuid4().hex}"
    started = tmp_path / "started"
    caller = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, threading, time
        from tasks.sandbox import Limits, run_python
        threading.Timer(1.0, lambda: pathlib.Path({str(started)!r}).write_text('x')).start()
        run_python("import time; time.sleep(60)  # {marker}", Limits(wall_s=60, cpu_s=5, memory_mb=256))
    """)], cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 30
        while not (started.exists() and processes_with(marker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_with(marker), "the sandbox never started"
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(marker) == []


def test_runs_as_an_unprivileged_user_without_capabilities():
    res = run("""
        import os
        print(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())
        print([line for line in open('/proc/self/status') if line.startswith('CapEff')][0].split()[1])
        try:
            os.unshare(os.CLONE_NEWUSER) if hasattr(os, 'unshare') else print('no unshare')
        except OSError as e:
            print('no userns', e.errno)
    """)
    lines = res.stdout.splitlines()
    assert lines[0] == "65534 65534 65534 []" and int(lines[1], 16) == 0
    assert "no u" in lines[2]
