"""Programs per second of the MBPP executor: `python -m tasks.bench_sandbox [--n N] [--unsafe]`.

Each program is a typical MBPP solution with its three asserts, run through `tasks.sandbox.run_tests` one
after another (as `MBPP.score` does), with the MBPP default limits. Prints one line: programs, seconds,
programs per second, and the sandbox mode.
"""
from __future__ import annotations

import argparse
import time

from tasks import sandbox

PROGRAM = ("def count_long_words(s, n):\n"
           "    return sum(1 for w in s.split() if len(w) > n)\n")
TESTS = ["assert count_long_words('the quick brown fox', 3) == 2",
         "assert count_long_words('', 1) == 0",
         "assert count_long_words('aaaa bb', 1) == 2"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="programs to run")
    ap.add_argument("--unsafe", action="store_true", help="run without the namespace boundary")
    args = ap.parse_args(argv)
    kwargs = {}
    mode = "enforced"
    if hasattr(sandbox, "SandboxMode"):
        mode = "unsafe" if args.unsafe else "enforced"
        kwargs["mode"] = mode
    else:
        mode = "fence (no boundary)"
    first = sandbox.run_tests(PROGRAM, TESTS, **kwargs)  # warm-up, and a check that the solution passes
    assert first.pass_at_1 == 1.0, first.error
    t0 = time.monotonic()
    for _ in range(args.n):
        rep = sandbox.run_tests(PROGRAM, TESTS, **kwargs)
        assert rep.pass_at_1 == 1.0, rep.error
    dt = time.monotonic() - t0
    print(f"{args.n} programs in {dt:.2f} s: {args.n / dt:.1f} programs/s (sandbox: {mode})")


if __name__ == "__main__":
    main()
