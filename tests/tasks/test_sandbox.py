"""The MBPP execution sandbox: limits hold, the network is closed, and the parent is never harmed (escapes by
adversarial programs: test_sandbox_escapes.py)."""
from __future__ import annotations

import os
import resource
import signal
import socket
import time

import pytest

from tasks.sandbox import Limits, run_python, run_tests, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

FAST = Limits(wall_s=5, cpu_s=2, memory_mb=256)


@pytest.fixture(autouse=True)
def parent_unharmed():
    """Every case must leave the test process exactly as it was."""
    limits = {r: resource.getrlimit(r) for r in (resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_FSIZE)}
    def environment():
        return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}

    cwd, pgrp, env = os.getcwd(), os.getpgrp(), environment()
    yield
    assert {r: resource.getrlimit(r) for r in limits} == limits
    assert os.getcwd() == cwd and os.getpgrp() == pgrp and environment() == env
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # the parent can still use the network stack
    s.bind(("127.0.0.1", 0))
    s.close()
    big = bytearray(64 * 1024 * 1024)  # and allocate freely
    assert len(big) == 64 * 1024 * 1024


def test_correct_solution_passes_and_wrong_one_fails():
    program = "def add(a, b):\n    return a + b\n"
    good = run_tests(program, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], limits=FAST)
    assert good.loaded and good.passed == (True, True) and good.pass_at_1 == 1.0 and good.test_pass_frac == 1.0
    half = run_tests(program, ["assert add(1, 2) == 3", "assert add(1, 2) == 4"], limits=FAST)
    assert half.passed == (True, False) and half.pass_at_1 == 0.0 and half.test_pass_frac == 0.5
    broken = run_tests("def add(a, b) return a +", ["assert add(1, 2) == 3"], limits=FAST)
    assert broken.passed == (False,) and broken.pass_at_1 == 0.0


def test_setup_code_and_trailing_garbage():
    # generation ran past the solution: the longest compilable prefix of whole lines is used
    program = "\ndef area(b):\n    return b.w * b.h\n\nProblem: next thing (\n"
    setup = "class B:\n    def __init__(self, w, h):\n        self.w, self.h = w, h"
    rep = run_tests(program, ["assert area(B(2, 3)) == 6"], setup=setup, limits=FAST)
    assert rep.loaded and rep.passed == (True,)


def test_exit_and_exceptions_count_as_failures():
    rep = run_tests("import sys\ndef f():\n    sys.exit(0)\n", ["f()", "assert True"], limits=FAST)
    assert rep.passed == (False, True)
    rep = run_tests("import os\nos._exit(0)\n", ["assert True"], limits=FAST)  # the harness dies with it
    assert rep.passed == (False,) and not rep.loaded
    rep = run_tests("raise ValueError('boom')", ["assert True"], limits=FAST)
    assert not rep.loaded and "ValueError" in rep.error and rep.passed == (False,)


def test_cpu_bound_infinite_loop_is_killed_at_cpu_limit():
    t0 = time.monotonic()
    res = run_python("while True:\n    pass\n", Limits(wall_s=60, cpu_s=1, memory_mb=256))
    elapsed = time.monotonic() - t0
    assert not res.ok and not res.timed_out  # the CPU limit ended it, not the wall clock
    assert res.signal in (signal.SIGXCPU, signal.SIGKILL)
    assert elapsed < 30, elapsed


def test_sleeping_loop_is_killed_at_wall_limit():
    t0 = time.monotonic()
    res = run_python("import time\nwhile True:\n    time.sleep(1)\n", Limits(wall_s=0.5, cpu_s=5, memory_mb=256))
    elapsed = time.monotonic() - t0
    assert res.timed_out and not res.ok and res.signal == signal.SIGKILL
    assert 0.5 <= elapsed < 10, elapsed
    rep = run_tests("import time\ndef f():\n    time.sleep(60)\n", ["assert True", "f()", "assert True"],
                    limits=Limits(wall_s=0.5, cpu_s=5, memory_mb=256))
    assert rep.passed == (True, False, False) and rep.error == "wall time limit exceeded"


def test_python_sockets_are_blocked():
    src = ("import socket\n"
           "for make in (lambda: socket.socket(), lambda: socket.create_connection(('127.0.0.1', 9), timeout=1),\n"
           "             lambda: socket.getaddrinfo('localhost', 80)):\n"
           "    try:\n        make()\n        print('OPENED')\n"
           "    except OSError as e:\n        print('blocked', e.errno)\n")
    res = run_python(src, FAST)
    assert res.ok, res.stderr
    assert "OPENED" not in res.stdout and res.stdout.count("blocked 13") == 3


def test_memory_beyond_limit_fails():
    res = run_python("x = bytearray(400 * 1024 * 1024)\nprint('allocated')\n", Limits(wall_s=5, cpu_s=2, memory_mb=256))
    assert not res.ok and "allocated" not in res.stdout and "MemoryError" in res.stderr
    ok = run_python("x = bytearray(50 * 1024 * 1024)\nprint('allocated')\n", Limits(wall_s=5, cpu_s=2, memory_mb=256))
    assert ok.ok and "allocated" in ok.stdout
    rep = run_tests("def f():\n    return bytearray(400 * 1024 * 1024)\n", ["assert len(f()) > 0", "assert True"],
                    limits=Limits(wall_s=5, cpu_s=2, memory_mb=256))
    assert rep.passed == (False, True)


def test_runs_in_a_private_scratch_folder_with_capped_output():
    res = run_python("import os\nprint(os.getcwd())\nopen('left.txt', 'w').write('x')\nprint('y' * 10**6)\n",
                     Limits(wall_s=5, cpu_s=2, memory_mb=256, output_bytes=4096))
    assert res.stdout.splitlines()[0] == "/tmp" and res.ok
    assert not os.path.exists("left.txt") and not os.path.exists("/tmp/left.txt")
    assert len(res.stdout) == 4096


def test_unsafe_mode_runs_the_same_harness_without_the_boundary():
    program = "def add(a, b):\n    return a + b\n"
    rep = run_tests(program, ["assert add(1, 2) == 3", "assert add(1, 2) == 4"], limits=FAST, mode="unsafe")
    assert rep.passed == (True, False) and rep.result.mode == "unsafe"
    res = run_python("import os\nprint(os.getuid())\n", FAST, mode="unsafe")
    assert res.stdout.strip() == str(os.getuid())  # the caller's own user: no boundary
