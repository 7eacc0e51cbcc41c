"""`fsearch bench train`: tokens/s and peak memory of one full fsearch training step.

A step is exactly what the worker does: prompt pass (Future-Seed on or off), answer pass seeded with the prompt's
final states, token-weighted cross-entropy over the answer, backward, gradient clipping, AdamW on fp32 master
weights, under bf16 autocast on CUDA. Swept over kernels (triton, fla when installed, torch) and FS off / on.
Tokens counted = prompt + answer tokens of the batch. Output: one JSON line per configuration.

    fsearch bench train --preset 0.1b-shape --prompt-len 2048 4096 --batch 8 --kernels triton fla torch
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def _fs_config(kind: str):
    from model.fs_config import FSConfig

    if kind == "off":
        return None
    # the heaviest library shape: every layer seeded, gradients through the seed, trainable gate
    return FSConfig(variant="scalar", alpha_init=-2.0, alpha_lr=5e-4, layer_start=1, norm=True, detach=False, clip=1.0)


def bench_one(preset_name: str, kernel: str, fs_kind: str, batch: int, prompt_len: int, answer_len: int,
              steps: int, warmup: int, device: str) -> dict:
    import torch

    from model.config import preset
    from model.future_seed import FSGates
    from model.init import init_weights
    from model.rwkv7 import RWKV7
    from orchestrator.worker import forward_answer_logits, token_losses
    from tasks.base import Example
    from orchestrator.worker import Batch

    cfg = preset(preset_name)
    model = RWKV7(cfg, kernel=kernel)
    init_weights(model, seed=0)
    model = model.to(device).float()
    fs = _fs_config(fs_kind)
    gates = FSGates(fs, cfg.n_layer, cfg.n_head, cfg.n_embd).to(device) if fs else None
    params = list(model.parameters()) + (list(gates.parameters()) if gates else [])
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    exs = [Example("", "", "", tuple(torch.randint(1, cfg.vocab_size, (prompt_len,), generator=g).tolist()), (),
                   tuple(torch.randint(1, cfg.vocab_size, (answer_len,), generator=g).tolist()))
           for _ in range(batch)]
    b = Batch(exs, False, 0, device)
    cuda = device.startswith("cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None

    def step():
        opt.zero_grad(set_to_none=True)
        if autocast:
            with autocast():
                logits, _ = forward_answer_logits(model, b, fs, gates, fs is not None)
        else:
            logits, _ = forward_answer_logits(model, b, fs, gates, fs is not None)
        loss = token_losses(logits, b).sum() / b.n_answer_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    tokens = batch * (prompt_len + answer_len)
    return {"bench": "train", "preset": preset_name, "kernel": kernel, "fs": fs_kind, "batch": batch,
            "prompt_len": prompt_len, "answer_len": answer_len, "step_ms": med * 1e3,
            "tokens_per_s": tokens / med, "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30) if cuda else None,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "steps_timed": steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fsearch bench train", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.1b-shape")
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--answer-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--kernels", nargs="+", default=["triton", "fla", "torch"])
    ap.add_argument("--fs", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for T in args.prompt_len:
        for kernel in args.kernels:
            for fs_kind in args.fs:
                try:
                    row = bench_one(args.preset, kernel, fs_kind, args.batch, T, args.answer_len, args.steps,
                                    args.warmup, device)
                except Exception as e:  # a backend that is not installed or runs out of memory is reported, not fatal
                    row = {"bench": "train", "preset": args.preset, "kernel": kernel, "fs": fs_kind, "prompt_len": T,
                           "batch": args.batch, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
                rows.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")
    # ratios: triton vs fla, FS overhead
    by = {(r["prompt_len"], r["kernel"], r["fs"]): r for r in rows if "tokens_per_s" in r}
    for T in args.prompt_len:
        for fs_kind in args.fs:
            t, f = by.get((T, "triton", fs_kind)), by.get((T, "fla", fs_kind))
            if t and f:
                print(json.dumps({"bench": "train_ratio", "prompt_len": T, "fs": fs_kind,
                                  "triton_over_fla": t["tokens_per_s"] / f["tokens_per_s"]}))
        for kernel in args.kernels:
            off, on = by.get((T, kernel, "off")), by.get((T, kernel, "on"))
            if off and on:
                print(json.dumps({"bench": "fs_overhead", "prompt_len": T, "kernel": kernel,
                                  "overhead": off["tokens_per_s"] / on["tokens_per_s"] - 1.0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
