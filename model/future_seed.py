"""Future-Seed: the seed state a block's WKV recurrence starts from, built from the previous block's final state.

Semantics (the original's, docs/original.md; options in model/fs_config.py). For a seeded block i
(i >= max(1, fs.layer_start)), given the previous block's final WKV state S_{i-1} [B, H, D, D] of the same forward:

    base = stopgrad(S_{i-1}) if fs.detach else S_{i-1}
    base = base / max(1e-6, rms(base))     if fs.norm     (rms over (D, D), per batch row and head)
    seed = base * g_i
    seed = clamp(seed, -fs.clip, fs.clip)  if fs.clip > 0

with the gate g_i = seed_scale * sched(i) * gate_i, where gate_i is

    sigmoid(alpha_i)                                          variant "scalar"   (one number)
    sigmoid(alpha_i) * sigmoid(alpha_head_{i,h})              variant "head"     (one number per head)
    sigmoid(alpha_i + <x_last, in_w_i> / sqrt(C) + in_b_i)    variant "input"    (one number per batch row)

x_last is the residual stream entering block i at the last position (the last real token: fsearch pads on the
left). The seed is ADDED to any explicit seed state; layer 0 and layers below layer_start are never seeded.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.fs_config import FSConfig

RMS_FLOOR = 1e-6  # the norm divides by max(RMS_FLOOR, rms)


def is_seeded(layer: int, n_layer: int, fs: FSConfig) -> bool:
    return layer in fs.seeded_layers(n_layer)


class FSGates(nn.Module):
    """Gate parameters of one FS configuration for a model of n_layer blocks.

    alpha [L] (every variant, init fs.alpha_init); alpha_head [L, H] (variant "head", init fs.head_init);
    in_w [L, C] and in_b [L] (variant "input", init 0). Rows of layers that are never seeded exist (so indices
    are layer numbers) but receive no gradient. A parameter whose learning rate is 0 is frozen.
    """

    def __init__(self, fs: FSConfig, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.fs, self.n_layer, self.n_head, self.n_embd = fs, n_layer, n_head, n_embd
        self.alpha = nn.Parameter(torch.full((n_layer,), float(fs.alpha_init)))
        self._lrs = {"alpha": fs.alpha_lr}
        if fs.variant == "head":
            self.alpha_head = nn.Parameter(torch.full((n_layer, n_head), float(fs.head_init)))
            self._lrs["alpha_head"] = fs.head_lr
        if fs.variant == "input":
            self.in_w = nn.Parameter(torch.zeros(n_layer, n_embd))
            self.in_b = nn.Parameter(torch.zeros(n_layer))
            self._lrs["in_w"] = fs.input_w_lr
            self._lrs["in_b"] = fs.input_b_lr
        for name, lr in self._lrs.items():
            getattr(self, name).requires_grad_(lr > 0)
        self._last_input_gate: dict[int, Tensor] = {}  # per layer: the last forward's per-row gates (detached)

    # optimizer ---------------------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """One AdamW group per trainable gate tensor (no weight decay); frozen tensors (lr 0) are left out."""
        return [{"params": [getattr(self, name)], "lr": lr, "weight_decay": 0.0, "name": f"fs_{name}"}
                for name, lr in self._lrs.items() if lr > 0]

    # the gate ----------------------------------------------------------------------------------------------------
    def gate(self, layer: int, x_in: Tensor | None = None) -> Tensor:
        """Effective gate g_i, shaped to broadcast against a [B, H, D, D] state: [1|B, 1|H, 1, 1], float32."""
        fs = self.fs
        multiplier = fs.seed_scale * fs.schedule_multiplier(layer, self.n_layer)
        if fs.variant == "input":
            if x_in is None:
                raise ValueError("fs.variant 'input' needs x_in, the residual stream entering the block")
            x_last = (x_in[:, -1] if x_in.dim() == 3 else x_in).float()  # [B, C]
            # elementwise product + sum (not a matmul) so that autocast leaves the logit in float32
            dot = (x_last * self.in_w[layer]).sum(dim=-1)
            logit = self.alpha[layer] + dot / math.sqrt(self.n_embd) + self.in_b[layer]
            g = torch.sigmoid(logit).view(-1, 1, 1, 1)
            self._last_input_gate[layer] = g.detach().flatten()
        else:
            g = torch.sigmoid(self.alpha[layer]).view(1, 1, 1, 1)
        if fs.variant == "head":
            g = g * torch.sigmoid(self.alpha_head[layer]).view(1, self.n_head, 1, 1)
        return g * multiplier

    # logging -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Effective gate per seeded layer (mean over heads; over batch rows of the last forward for 'input',
        or at x = 0 before any forward), their mean, and the original's `alpha_mean` = mean sigmoid(alpha[1:])."""
        out: dict[str, float] = {}
        for i in self.fs.seeded_layers(self.n_layer):
            if self.fs.variant == "input":
                g = self._last_input_gate.get(i)
                if g is None:
                    g = torch.sigmoid(self.alpha[i] + self.in_b[i])
                g = g.float().mean() * self.fs.seed_scale * self.fs.schedule_multiplier(i, self.n_layer)
            else:
                g = self.gate(i).mean()
            out[f"gate_l{i}"] = float(g)
        seeded = list(out.values())
        out["gate_mean"] = sum(seeded) / len(seeded) if seeded else 0.0
        out["alpha_mean"] = float(torch.sigmoid(self.alpha[1:]).mean()) if self.n_layer > 1 else 0.0
        return out


def future_seed(prev_sT: Tensor, layer: int, n_layer: int, fs: FSConfig, gates: FSGates,
                x_in: Tensor | None = None) -> Tensor:
    """The FS seed for block `layer` (to be added to any explicit seed), float32 [B, H, D, D].

    prev_sT: the previous block's final WKV state [B, H, D, D] (RWKV [value, key] layout) from the same forward.
    x_in: the residual stream entering the block, [B, T, C] (its last position is used) or [B, C]; needed only
    by variant "input".
    """
    if not is_seeded(layer, n_layer, fs):
        raise ValueError(f"layer {layer} receives no seed (fs.layer_start={fs.layer_start}, layer 0 never does)")
    if gates.n_layer != n_layer or gates.fs != fs:
        raise ValueError("FS gates were built for a different FS configuration or model depth")
    base = (prev_sT.detach() if fs.detach else prev_sT).float()
    if fs.norm:
        rms = base.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()
        base = base / rms.clamp_min(RMS_FLOOR)
    seed = base * gates.gate(layer, x_in)
    if fs.clip > 0:
        seed = seed.clamp(-fs.clip, fs.clip)
    return seed
