"""AdamW on fp32 master weights, the same update as torch.optim.AdamW (no amsgrad), one tensor at a time or with
torch's multi-tensor (`_foreach_*`) kernels.

fsearch starts one worker process per run, and torch.optim's optimizers import torch._dynamo when they are built,
seconds of start-up that a round of thirty short runs pays thirty times. This plain implementation of the same update avoids that; with `foreach` (the default) it launches one kernel
per operation for all the parameters that share a device, dtype and step count, as torch.optim.AdamW(foreach=True)
does on a GPU. With `fused`, one kernel per parameter list does the whole update (torch's fused AdamW kernel, as
torch.optim.AdamW(fused=True)): it reads each parameter, gradient and moment once instead of a dozen times, ~3 ms less
per step of the 0.1B shape on an H100; the graph-replayed GPU step uses it (worker/run.py). tests/model/test_optim.py
checks every mode against torch.optim.AdamW.

    m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
    p ← p·(1 − lr·wd) − lr · (m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + eps)
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch


class AdamW:
    def __init__(self, groups: list[dict], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 foreach: bool = True, fused: bool = False):
        self.param_groups = [dict(g, params=list(g["params"])) for g in groups]
        for g in self.param_groups:
            g.setdefault("weight_decay", 0.0)
        self.betas, self.eps, self.foreach, self.fused = betas, eps, foreach, fused
        self.state: dict[torch.Tensor, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def _advance(self, p: torch.Tensor) -> dict:
        """p's state (created on its first step) with its step count advanced by one."""
        st = self.state.get(p)
        if st is None:
            st = self.state[p] = {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)}
        st["t"] += 1
        return st

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if self.fused:
                self._update_fused(params, g["lr"], g["weight_decay"])
            elif self.foreach:
                # a parameter that missed a step has its own step count: bucket by it (and by device and dtype,
                # which the multi-tensor kernels need to share)
                buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
                for p in params:
                    buckets[(p.device, p.dtype, self._advance(p)["t"])].append(p)
                for (_, _, t), ps in buckets.items():
                    self._update_foreach(ps, t, g["lr"], g["weight_decay"])
            else:
                for p in params:
                    self._update_one(p, g["lr"], g["weight_decay"])

    def _update_one(self, p: torch.Tensor, lr: float, wd: float) -> None:
        b1, b2 = self.betas
        st = self._advance(p)
        t, m, v, grad = st["t"], st["m"], st["v"], p.grad
        p.mul_(1 - lr * wd)
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(self.eps)
        p.addcdiv_(m, denom, value=-lr / (1 - b1**t))

    def _update_foreach(self, ps: list[torch.Tensor], t: int, lr: float, wd: float) -> None:
        b1, b2 = self.betas
        ms = [self.state[p]["m"] for p in ps]
        vs = [self.state[p]["v"] for p in ps]
        grads = [p.grad for p in ps]
        if wd:
            torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_lerp_(ms, grads, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, math.sqrt(1 - b2**t))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(ps, ms, denom, value=-lr / (1 - b1**t))

    def _update_fused(self, ps: list[torch.Tensor], lr: float, wd: float) -> None:
        """The whole update in one fused kernel per device and dtype; each parameter's step count also lives in a
        float tensor beside it (the kernel reads its bias corrections from there)."""
        b1, b2 = self.betas
        buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in ps:
            st = self._advance(p)
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            buckets[(p.device, p.dtype)].append(p)
        for bucket in buckets.values():
            steps = [self.state[p]["step"] for p in bucket]
            torch._foreach_add_(steps, 1.0)
            torch._fused_adamw_(bucket, [p.grad for p in bucket], [self.state[p]["m"] for p in bucket],
                                [self.state[p]["v"] for p in bucket], [], steps, lr=lr, beta1=b1, beta2=b2,
                                weight_decay=wd, eps=self.eps, amsgrad=False, maximize=False)
