"""CPU benchmark of the WKV-7 operator: the chunked torch path against the per-step reference.

    python -m kernels.bench_cpu [--batch 1 --seq 512 --heads 4 --head-size 64 --repeats 7]

Prints one JSON object per line: for each backend and pass ("forward", "forward_backward") the median time over
the repeats (wall clock, or with --clock cpu this process's CPU time) and the tokens/s (B·T / median), then one
line per pass with the ratio torch / reference.
Inputs are RWKV-7-like (kernels.reference.rwkv7_like_inputs), fp32. The median hides other processes on a
shared machine only partly: the load average at the start is printed so that such a run can be recognised.
"forward" runs under torch.no_grad(), so the torch backend takes its forward-only path (torch_chunked.wkv7_forward);
"forward_backward" takes the autograd route (WKV7Chunked).

Measured at the defaults (B1 T512 H4 D64 fp32) on the project's 2-core AMD EPYC VM (KVM, Zen 5), which other jobs
share: its speed drifts by ~25% from minute to minute, so ratios from one run are the thing to compare.

    pass               clock, threads   reference     torch         speedup   (torch before the forward-only path)
    forward            wall, 2          22-27 ms      1.4-2.0 ms    12-16x    (2.6-3.7 ms: 6.5-9.7x)
    forward            cpu, 1           20-23 ms      2.3-3.3 ms    6.5-9x    (4.4-7 ms: 3-5x)
    forward_backward   wall, 2          170-205 ms    10.3-12.5 ms  15-18x    (unchanged)
    forward_backward   cpu, 1           180-212 ms    17-19 ms      9-11x     (unchanged)

The goal of 20x on the forward is not reached: see kernels/torch_chunked.py for where the 1.4 ms go.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from kernels.reference import rwkv7_like_inputs, wkv7_reference
from kernels.torch_chunked import DEFAULT_CHUNK, wkv7_torch

DEFAULTS = dict(batch=1, seq=512, heads=4, head_size=64, repeats=7, warmup=2, chunk=DEFAULT_CHUNK, seed=0)
CLOCKS = {
    "wall": time.perf_counter,
    # CPU time of this process (all its threads): with --threads 1 it barely moves when other processes share the
    # cores, so it is the steadier measure on a busy machine; with several threads it also counts their spinning
    "cpu": time.process_time,
}


def _median_seconds(fn, repeats: int, warmup: int, clock) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def _forward(op, inputs):
    def run():
        with torch.no_grad():
            op(*inputs)
    return run


def _forward_backward(op, inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]

    def run():
        y, sT = op(*leaves)
        torch.autograd.backward((y, sT), (torch.ones_like(y), torch.ones_like(sT)))
        for x in leaves:
            x.grad = None
    return run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fsearch bench operator", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    p.add_argument("--seq", type=int, default=DEFAULTS["seq"])
    p.add_argument("--heads", type=int, default=DEFAULTS["heads"])
    p.add_argument("--head-size", type=int, default=DEFAULTS["head_size"])
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="timed runs per measurement (median)")
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    p.add_argument("--chunk", type=int, default=DEFAULTS["chunk"], help="chunk size of the torch path")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or this process's CPU time (steadier on a shared machine with --threads 1)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    B, T, H, D = args.batch, args.seq, args.heads, args.head_size
    inputs = rwkv7_like_inputs(B, T, H, D, seed=args.seed)
    backends = {
        "reference": wkv7_reference,
        "torch": lambda *x: wkv7_torch(*x, chunk=args.chunk),
    }
    passes = {"forward": _forward} if args.no_backward else {"forward": _forward, "forward_backward": _forward_backward}
    common = dict(B=B, T=T, H=H, D=D, dtype="float32", device="cpu", threads=torch.get_num_threads(), clock=args.clock,
                  repeats=args.repeats, machine=platform.machine(), cpus=os.cpu_count(),
                  loadavg_1min=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
    tokens = B * T
    rates = {}
    for pass_name, make in passes.items():
        for name, op in backends.items():
            sec = _median_seconds(make(op, inputs), args.repeats, args.warmup, CLOCKS[args.clock])
            rates[pass_name, name] = tokens / sec
            line = {"bench": "wkv7_cpu", "backend": name, "pass": pass_name, "median_ms": round(sec * 1e3, 3),
                    "tokens_per_s": round(tokens / sec, 1), **common}
            if name == "torch":
                line["chunk"] = args.chunk
            print(json.dumps(line), flush=True)
        ratio = rates[pass_name, "torch"] / rates[pass_name, "reference"]
        print(json.dumps({"bench": "wkv7_cpu", "pass": pass_name, "speedup_torch_over_reference": round(ratio, 2),
                          **common}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
