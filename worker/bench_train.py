"""`fsearch bench train`: tokens/s and peak memory of one full fsearch training step.

A step is exactly what the worker does: prompt pass (Future-Seed on or off), answer pass seeded with the prompt's
final states, token-weighted cross-entropy over the answer, backward, gradient clipping, AdamW on fp32 master
weights, under bf16 autocast on CUDA; with `--compile on` the blocks' work around the WKV kernel is torch.compile'd,
as a spec's `compile: on` does (`--compile off on` measures both; `graphs`: the worker's GPU default, compiled blocks
and the step's forward, loss and backward replayed as one CUDA graph, worker/fast_step.py).
Swept over kernels (triton, fla when installed, torch) and FS off / on. Every group is timed together with the peer,
fla's own RWKV7ForCausalLM at the same shape doing the same work (`--peer none` leaves it out; where fla's models or
CUDA are missing, one line says it was skipped), and each fsearch row's tokens/s and peak memory over the peer's are
printed (`peer_ratio` lines).
Tokens counted = prompt + answer tokens of the batch. The FS variants of one kernel stay in memory together and
are timed in alternating rounds (time_group), so that the FS overhead, a difference of a few percent, is not
buried under drift between configurations timed one after the other. Output: one JSON line per configuration
(median step time with its 20th and 80th percentiles, tokens/s, peak memory as if the configuration ran alone, the
first step's time, which includes compiling and autotuning), then the ratios.

    fsearch bench train --preset 0.1b-shape --prompt-len 2048 4096 --batch 8 --kernels triton fla torch
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext

import torch

from model.config import preset
from model.fs_config import FSConfig
from model.future_seed import FSGates
from model.init import init_weights
from model.optim import AdamW
from model.rwkv7 import RWKV7
from orchestrator.runconfig import COMPILED_MODES, GRAPH_MODES
from tasks.base import Example
from worker.batches import Batch, forward_answer_logits, token_losses
from worker.fast_step import FastStep, StepInputs, loss_weights


def _fs_config(kind: str):
    if kind == "off":
        return None
    # the heaviest library shape: every layer seeded, gradients through the seed, trainable gate
    return FSConfig(variant="scalar", alpha_init=-2.0, alpha_lr=5e-4, layer_start=1, norm=True, detach=False, clip=1.0)


class TrainBench:
    """One configuration of the benchmark: its model, FS gates, optimizer and batch, and its training step."""

    def __init__(self, preset_name: str, kernel: str, fs_kind: str, batch: int, prompt_len: int, answer_len: int,
                 device: str, compiled: bool = False, cuda_graphs: bool = False, pool=None):
        self.meta = {"bench": "train", "preset": preset_name, "kernel": kernel, "fs": fs_kind, "batch": batch,
                     "prompt_len": prompt_len, "answer_len": answer_len, "compile": compiled, "cuda_graphs": cuda_graphs}
        cfg = preset(preset_name)
        model = RWKV7(cfg, kernel=kernel, compile_backend="inductor" if compiled else None)
        init_weights(model, seed=0)
        self.model = model.to(device).float()
        self.fs = _fs_config(fs_kind)
        self.gates = FSGates(self.fs, cfg.n_layer, cfg.n_head, cfg.n_embd).to(device) if self.fs else None
        self.params = list(self.model.parameters()) + (list(self.gates.parameters()) if self.gates else [])
        # as the worker: the fused update with the graph-replayed step, the multi-tensor one otherwise
        self.opt = AdamW([{"params": [p for p in self.params if p.requires_grad], "lr": 1e-4, "weight_decay": 0.01}],
                         fused=cuda_graphs)
        g = torch.Generator().manual_seed(0)
        exs = [Example("", "", "", tuple(torch.randint(1, cfg.vocab_size, (prompt_len,), generator=g).tolist()), (),
                       tuple(torch.randint(1, cfg.vocab_size, (answer_len,), generator=g).tolist()))
               for _ in range(batch)]
        self.batch = Batch(exs, False, 0, device)
        self.tokens = batch * (prompt_len + answer_len)
        self.cuda = device.startswith("cuda")
        self.fast = None
        if cuda_graphs:  # the worker's default GPU step: graph replays of forward + loss + backward
            self.fast = FastStep(self.model, self.params, self.fs, self.gates, pool=pool)
            weight = loss_weights(self.batch, "mean_token", self.batch.n_answer_tokens, batch)
            self.inputs = StepInputs.of(self.batch, weight)

    def step(self) -> None:
        if self.fast is not None:
            self.fast.begin()
            self.fast.micro(self.inputs)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            return
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext():
            logits, _ = forward_answer_logits(self.model, self.batch, self.fs, self.gates, self.fs is not None)
        loss = token_losses(logits, self.batch).sum() / self.batch.n_answer_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()

    @property
    def allocates_in_warmup(self) -> bool:
        """Whether memory the step needs is allocated once in the warm-up and kept (a graph's memory pool)."""
        return self.fast is not None

    def resident_bytes(self) -> int:
        """Bytes this configuration keeps between steps: parameters, gradients, optimizer state (not a graph pool)."""
        tensors = [p for p in self.params] + [p.grad for p in self.params if p.grad is not None]
        tensors += [t for st in self.opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


PEER_KERNEL = "fla-model"


class PeerUnavailable(Exception):
    """The peer model cannot run here (fla's models not installed, or no GPU for its Triton kernels)."""


class FlaModelBench:
    """The peer: fla's own RWKV7ForCausalLM (fused Triton token shift, LoRAs, norms and chunk_rwkv7) at the preset's
    shape, doing the same work as a TrainBench step: the prompt and the answer inputs in one pass, logits and
    cross-entropy on the answer positions only, fp32 master weights, bf16 autocast, fused AdamW, clip 1.0."""

    def __init__(self, preset_name: str, batch: int, prompt_len: int, answer_len: int, device: str):
        if not device.startswith("cuda"):
            raise PeerUnavailable("fla's RWKV7ForCausalLM runs on CUDA only")
        try:
            from fla.models import RWKV7Config, RWKV7ForCausalLM
        except ImportError as e:
            raise PeerUnavailable(f"fla's models are not installed (pip install flash-linear-attention): {e}") from None

        cfg = preset(preset_name)
        self.meta = {"bench": "train_peer", "preset": preset_name, "kernel": PEER_KERNEL, "fs": "off", "batch": batch,
                     "prompt_len": prompt_len, "answer_len": answer_len, "compile": False}
        peer_cfg = RWKV7Config(hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, head_dim=cfg.head_size,
                               intermediate_size=cfg.ffn_dim, decay_low_rank_dim=cfg.d_decay,
                               a_low_rank_dim=cfg.d_aaa, v_low_rank_dim=cfg.d_mv, gate_low_rank_dim=cfg.d_gate,
                               vocab_size=cfg.vocab_size, use_cache=False)
        self.model = RWKV7ForCausalLM(peer_cfg).to(device).float().train()
        self.params = list(self.model.parameters())
        # the fused update, as torch.optim.AdamW(fused=True) (the usual choice for this model) does it
        self.opt = AdamW([{"params": self.params, "lr": 1e-4, "weight_decay": 0.01}], fused=True)
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(1, cfg.vocab_size, (batch, prompt_len), generator=g)
        self.answer = torch.randint(1, cfg.vocab_size, (batch, answer_len), generator=g).to(device)
        # the answer pass reads the answer shifted by one: prompt + answer[:-1] in, answer_len logits out
        self.ids = torch.cat([prompt.to(device), self.answer[:, :-1]], dim=1)
        self.tokens = batch * (prompt_len + answer_len)
        self.cuda = True

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = self.model(input_ids=self.ids, logits_to_keep=self.answer.shape[1], use_cache=False).logits
        V = logits.shape[-1]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), self.answer.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()

    def resident_bytes(self) -> int:
        tensors = self.params + [p.grad for p in self.params if p.grad is not None]
        tensors += [t for st in self.opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def profile_step(bench, steps: int = 2, top: int = 12) -> dict:
    """Where a step's time goes, from torch.profiler over `steps` steps: wall time per step, the GPU's busy time per
    step (sum of kernel durations), kernel launches per step, and the kernels taking the most GPU time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            bench.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / steps / 1e3
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name[:80]] = by_name.get(e.name[:80], 0.0) + e.device_time / steps / 1e3
    return {**bench.meta, "bench": "train_profile", "step_ms": wall * 1e3, "gpu_busy_ms": busy,
            "launches_per_step": len(kernels) / steps,
            "top_kernels_ms": dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:top])}


def peer_ratios(rows: list[dict]) -> list[dict]:
    """fsearch's tokens/s over the peer's, for every timed fsearch row of one group (one prompt length and compile
    setting, timed interleaved with the peer), and peak memory over the peer's."""
    peers = [r for r in rows if r.get("bench") == "train_peer" and "tokens_per_s" in r]
    if not peers:
        return []
    peer = peers[0]
    out = []
    for r in rows:
        if r.get("bench") != "train" or "tokens_per_s" not in r:
            continue
        mem = (r["peak_mem_gib"] / peer["peak_mem_gib"]) if r.get("peak_mem_gib") and peer.get("peak_mem_gib") else None
        out.append({"bench": "peer_ratio", "prompt_len": r["prompt_len"], "kernel": r["kernel"], "fs": r["fs"],
                    "compile": step_label(r), "peer": peer["kernel"],
                    "over_peer": r["tokens_per_s"] / peer["tokens_per_s"], "mem_over_peer": mem})
    return out


def step_label(meta: dict) -> str | bool:
    """A configuration's step as the rows name it: "graphs", "eager-graphs", or the compile flag."""
    if meta.get("cuda_graphs"):
        return "graphs" if meta.get("compile") else "eager-graphs"
    return meta["compile"]


def note(line: str) -> None:
    print(f"# {line}", file=sys.stderr, flush=True)


def describe(b) -> str:
    m = b.meta
    step = m.get("cuda_graphs") and step_label(m) or ("compiled" if m.get("compile") else "eager")
    return f"{m.get('kernel')} fs={m.get('fs')} {step} prompt={m.get('prompt_len')} batch={m.get('batch')}"


def time_group(benches: list[TrainBench], steps: int, warmup: int, rounds: int) -> list[dict]:
    """Time several configurations kept in memory together, in alternating order (ABC, CBA, ABC, ...) so that slow
    drift (clocks, allocator growth, a first-configuration effect) spreads over all of them instead of biasing the
    one timed first. Each configuration's peak memory is taken as if it were alone: the device's peak during its
    first timed step minus what the other configurations keep resident; for a graph-replayed configuration, whose
    graph memory pool is allocated in the warm-up and kept, the peak over its warm-up (eager step, capture, replay)
    and that step."""
    cuda = benches[0].cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    first: list[float | None] = [None] * len(benches)
    peaks: list[float | None] = [None] * len(benches)
    for i, b in enumerate(benches):
        pool_during_warmup = cuda and getattr(b, "allocates_in_warmup", False)
        if pool_during_warmup:  # a graph's pool is allocated in the warm-up and stays: its peak is this one
            others = torch.cuda.memory_allocated() - b.resident_bytes()
            torch.cuda.reset_peak_memory_stats()
        # on stderr, so that a long first step (compiling; the peer autotunes for minutes) shows what it is doing
        note(f"warming up {describe(b)}")
        for j in range(max(warmup, 2 if pool_during_warmup else 0)):  # graphs: eager step + capture, then a replay
            t = time.perf_counter()
            b.step()
            sync()
            if j == 0:
                first[i] = time.perf_counter() - t
                note(f"first step of {describe(b)}: {first[i]:.1f} s")
        if pool_during_warmup:
            peaks[i] = (torch.cuda.max_memory_allocated() - others) / 2**30
    times: list[list[float]] = [[] for _ in benches]
    for r in range(rounds):
        order = list(range(len(benches)))
        if r % 2:
            order.reverse()
        for i in order:
            b = benches[i]
            for j in range(steps):
                if cuda and r == 0 and j == 0:
                    others = torch.cuda.memory_allocated() - b.resident_bytes()
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                b.step()
                sync()
                times[i].append(time.perf_counter() - t)
                if cuda and r == 0 and j == 0:
                    step_peak = (torch.cuda.max_memory_allocated() - others) / 2**30
                    peaks[i] = max(peaks[i] or 0.0, step_peak)
    rows = []
    for b, ts, peak, first_s in zip(benches, times, peaks, first):
        ts = sorted(ts)
        med = ts[len(ts) // 2]
        rows.append({**b.meta, "step_ms": med * 1e3, "step_ms_p20": ts[int(0.2 * (len(ts) - 1))] * 1e3,
                     "step_ms_p80": ts[int(0.8 * (len(ts) - 1))] * 1e3, "tokens_per_s": b.tokens / med,
                     "peak_mem_gib": peak, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                     "steps_timed": len(ts), "rounds": rounds, "first_step_s": first_s})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fsearch bench train", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.1b-shape")
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--answer-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--kernels", nargs="+", default=["triton", "fla", "torch"])
    ap.add_argument("--fs", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the FS variants of a kernel, alternating order")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on", "graphs", "eager-graphs"],
                    help="torch.compile the blocks around the WKV kernel (spec: defaults.compile); graphs: compiled "
                         "blocks, and forward + loss + backward replayed as a CUDA graph (the GPU default); "
                         "eager-graphs: the same replays without torch.compile")
    ap.add_argument("--peer", default=PEER_KERNEL, choices=[PEER_KERNEL, "none"],
                    help="time fla's RWKV7ForCausalLM in every group too (same shape, batch, tokens and work)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    ap.add_argument("--profile", action="store_true", help="after timing, profile each configuration (CUDA only)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    def error_row(kernel: str, fs_kind: str, T: int, e: Exception) -> dict:
        return {"bench": "train", "preset": args.preset, "kernel": kernel, "fs": fs_kind, "prompt_len": T,
                "batch": args.batch, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}

    compile_modes = list(dict.fromkeys((c in COMPILED_MODES, c in GRAPH_MODES) for c in args.compile))
    peer_note_printed = False
    for T in args.prompt_len:
        for kernel, (compiled, graphs) in ((k, c) for k in args.kernels for c in compile_modes):
            # the FS variants of one kernel are timed together, interleaved: the FS overhead is a small difference
            group, failed = [], []
            # the group's graphs share one memory pool, as one configuration's graphs do (one replays at a time)
            pool = torch.cuda.graph_pool_handle() if graphs and device.startswith("cuda") else None
            for fs_kind in args.fs:
                try:
                    group.append(TrainBench(args.preset, kernel, fs_kind, args.batch, T, args.answer_len, device,
                                            compiled, graphs, pool))
                except Exception as e:  # a backend that is not installed is reported, not fatal
                    failed.append({**error_row(kernel, fs_kind, T, e), "compile": compiled, "cuda_graphs": graphs})
            if args.peer != "none" and group:
                try:
                    group.append(FlaModelBench(args.preset, args.batch, T, args.answer_len, device))
                except PeerUnavailable as e:  # optional: one line, once
                    if not peer_note_printed:
                        emit({"bench": "train_peer", "kernel": args.peer, "skipped": str(e)})
                        peer_note_printed = True
            try:
                timed = time_group(group, args.steps, args.warmup, args.rounds) if group else []
            except Exception as e:  # e.g. out of memory: every configuration of the group gets the error
                timed = [{**error_row(b.meta["kernel"], b.meta["fs"], T, e), "compile": compiled,
                          "cuda_graphs": graphs} for b in group]
            for row in timed + failed:
                emit(row)
            for row in peer_ratios(timed):
                emit(row)
            if args.profile and device.startswith("cuda") and all("tokens_per_s" in r for r in timed):
                for b in group:
                    emit(profile_step(b))
                del b  # the last configuration (and its graph pool) must not outlive the group
            del group, pool
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    for line in ratios(rows):
        print(json.dumps(line))
    return 0


def ratios(rows: list[dict]) -> list[dict]:
    """triton over fla (same FS and compile setting), the FS overhead (same kernel and compile setting) and the
    speed-up of compiling (same kernel and FS), from the timed rows; compile is "graphs" for CUDA-graph rows."""
    by = {(r["prompt_len"], r["kernel"], r["fs"], step_label(r)): r["tokens_per_s"]
          for r in rows if "tokens_per_s" in r and r["bench"] == "train"}
    out = []
    for (T, kernel, fs, compiled), tps in by.items():
        if kernel == "triton" and (T, "fla", fs, compiled) in by:
            out.append({"bench": "train_ratio", "prompt_len": T, "fs": fs, "compile": compiled,
                        "triton_over_fla": tps / by[(T, "fla", fs, compiled)]})
        if fs == "on" and (T, kernel, "off", compiled) in by:
            out.append({"bench": "fs_overhead", "prompt_len": T, "kernel": kernel, "compile": compiled,
                        "overhead": by[(T, kernel, "off", compiled)] / tps - 1.0})
        if compiled and (T, kernel, fs, False) in by:
            out.append({"bench": "compile_speedup", "prompt_len": T, "kernel": kernel, "fs": fs,
                        "speedup": tps / by[(T, kernel, fs, False)]})
    return out


if __name__ == "__main__":
    sys.exit(main())
