"""CPU throughput of the RWKV7 forward (and forward + backward), as JSON lines.

    python -m model.bench_cpu                      # 4 layers, width 128, head 32, B=4, T=256, kernel auto
    python -m model.bench_cpu --kernel reference --kernel auto --backward

One line per (kernel, mode): tokens/s = B*T / median seconds of `--repeats` timed calls after one warm-up call.
Weights: RWKV-7's own init (model/init.py) with seed 0, byte vocabulary (257).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from model.config import BYTE_VOCAB, ModelConfig
from model.init import init_weights
from model.rwkv7 import RWKV7


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fsearch bench model", description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--head-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kernel", action="append", help="WKV kernel (repeatable); default: auto")
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = ModelConfig(vocab_size=BYTE_VOCAB, n_layer=args.n_layer, n_embd=args.n_embd, head_size=args.head_size,
                          tokenizer="byte")
    except ValueError as e:  # pydantic's ValidationError: report the validator's own message
        message = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
        print(f"error: {message}", file=sys.stderr)
        return 2
    idx = torch.randint(0, BYTE_VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    modes = ["forward"] + (["forward_backward"] if args.backward else [])
    for kernel in args.kernel or ["auto"]:
        model = init_weights(RWKV7(cfg, kernel=kernel), seed=0)
        for mode in modes:
            def call():
                if mode == "forward":
                    with torch.no_grad():
                        model(idx)
                else:
                    model.zero_grad(set_to_none=True)
                    logits, _ = model(idx)
                    logits.logsumexp(-1).mean().backward()

            call()  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            sec = statistics.median(times)
            print(json.dumps({
                "bench": "model_cpu", "mode": mode, "kernel": kernel, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
                "head_size": cfg.head_size, "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
                "repeats": args.repeats, "seconds_median": round(sec, 6),
                "tokens_per_s": round(args.batch * args.seq / sec, 1),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
