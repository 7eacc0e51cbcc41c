"""AdamW on fp32 master weights, the same update as torch.optim.AdamW (single-tensor path, no amsgrad).

fsearch starts one worker process per run. torch.optim's optimizers import torch._dynamo when they are built
(about 1.2 s on the CPU machines), which a demo round of thirty short runs pays thirty times; this plain
implementation of the same update avoids that. tests/model/test_optim.py checks it against torch.optim.AdamW.

    m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
    p ← p·(1 − lr·wd) − lr · (m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + eps)
"""
from __future__ import annotations

import math

import torch


class AdamW:
    def __init__(self, groups: list[dict], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param_groups = [dict(g, params=list(g["params"])) for g in groups]
        for g in self.param_groups:
            g.setdefault("weight_decay", 0.0)
        self.betas, self.eps = betas, eps
        self.state: dict[torch.Tensor, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state.get(p)
                if st is None:
                    st = self.state[p] = {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)}
                st["t"] += 1
                t, m, v, grad = st["t"], st["m"], st["v"], p.grad
                p.mul_(1 - lr * wd)
                m.lerp_(grad, 1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                step_size = lr / (1 - b1**t)
                denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(self.eps)
                p.addcdiv_(m, denom, value=-step_size)
