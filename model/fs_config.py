"""Future-Seed configuration: every option of the original, validated before any compute. Torch-free.

Semantics (the pure function lives in model/future_seed.py): for block i >= max(1, layer_start), the block's
initial WKV state is the previous block's final state, optionally detached, RMS-normalised, multiplied by the
gate g_i, and clipped, then added to any explicit seed state:

    g_i = seed_scale * sched(i) * gate_i
    gate_i = sigmoid(alpha_i)                                        variant "scalar"
           = sigmoid(alpha_i) * sigmoid(alpha_head_{i,h})            variant "head"
           = sigmoid(alpha_i + <x_last, in_w_i>/sqrt(C) + in_b_i)    variant "input" (per sample; in_w, in_b start at 0)

Order of operations: normalise, then gate, then clip. Layer 0 never receives a seed.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

NOOP_GATE = 1e-2  # a configuration whose seeded layers all start below this gate is flagged as close to a no-op


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class FSConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Literal["scalar", "head", "input"] = "scalar"
    alpha_init: float = -2.0  # per-layer scalar gate logit
    alpha_lr: float = 0.0  # 0 freezes the scalar gate
    alpha_head_init: float | None = None  # head variant; defaults to alpha_init
    alpha_head_lr: float | None = None  # defaults to alpha_lr
    in_w_lr: float | None = None  # input variant; defaults to alpha_lr
    in_b_lr: float | None = None  # input variant; defaults to alpha_lr
    layer_start: int = 1  # first block that receives a seed (>= 1)
    seed_scale: float = 1.0
    schedule: Literal["none", "linear", "cosine"] = "none"
    schedule_min: float = 1.0
    schedule_max: float = 1.0
    norm: bool = False  # divide the previous final state by its RMS over (D, D), per (batch, head)
    clip: float = 0.0  # > 0: clamp the seed to [-clip, clip]
    detach: bool = False  # stop gradients into the previous layer's state

    @model_validator(mode="after")
    def _check(self) -> "FSConfig":
        if self.layer_start < 1:
            raise ValueError(f"fs.layer_start must be >= 1 (layer 0 never receives a seed), got {self.layer_start}")
        if self.clip < 0:
            raise ValueError(f"fs.clip must be >= 0 (0 disables clipping), got {self.clip}")
        if self.seed_scale <= 0:
            raise ValueError(f"fs.seed_scale must be > 0, got {self.seed_scale}")
        for name in ("alpha_lr", "alpha_head_lr", "in_w_lr", "in_b_lr"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"fs.{name} must be >= 0, got {v}")
        if self.schedule != "none" and (self.schedule_min < 0 or self.schedule_max < 0):
            raise ValueError("fs.schedule_min and fs.schedule_max must be >= 0")
        if self.variant != "head" and (self.alpha_head_init is not None or self.alpha_head_lr is not None):
            raise ValueError(f"fs.alpha_head_init/alpha_head_lr apply only to variant 'head', not {self.variant!r}")
        if self.variant != "input" and (self.in_w_lr is not None or self.in_b_lr is not None):
            raise ValueError(f"fs.in_w_lr/in_b_lr apply only to variant 'input', not {self.variant!r}")
        return self

    # resolved defaults -------------------------------------------------------------------------------------------
    @property
    def head_init(self) -> float:
        return self.alpha_init if self.alpha_head_init is None else self.alpha_head_init

    @property
    def head_lr(self) -> float:
        return self.alpha_lr if self.alpha_head_lr is None else self.alpha_head_lr

    @property
    def input_w_lr(self) -> float:
        return self.alpha_lr if self.in_w_lr is None else self.in_w_lr

    @property
    def input_b_lr(self) -> float:
        return self.alpha_lr if self.in_b_lr is None else self.in_b_lr

    @property
    def trainable(self) -> bool:
        lrs = [self.alpha_lr]
        if self.variant == "head":
            lrs.append(self.head_lr)
        if self.variant == "input":
            lrs += [self.input_w_lr, self.input_b_lr]
        return any(lr > 0 for lr in lrs)

    # depth schedule and gates ----------------------------------------------------------------------------------------
    def seeded_layers(self, n_layer: int) -> list[int]:
        return list(range(max(1, self.layer_start), n_layer))

    def schedule_multiplier(self, layer: int, n_layer: int) -> float:
        if self.schedule == "none":
            return 1.0
        i0 = max(1, self.layer_start)
        i1 = max(i0, n_layer - 1)
        p = 1.0 if i1 <= i0 else min(1.0, max(0.0, (layer - i0) / (i1 - i0)))
        lo, hi = self.schedule_min, self.schedule_max
        if self.schedule == "linear":
            return lo + (hi - lo) * p
        return lo + (hi - lo) * (0.5 - 0.5 * math.cos(math.pi * p))

    def initial_gate(self, layer: int, n_layer: int) -> float:
        """Effective gate of a seeded layer at initialisation (input gate's weights start at zero)."""
        g = sigmoid(self.alpha_init)
        if self.variant == "head":
            g *= sigmoid(self.head_init)
        return self.seed_scale * self.schedule_multiplier(layer, n_layer) * g

    def initial_gates(self, n_layer: int) -> dict[int, float]:
        return {i: self.initial_gate(i, n_layer) for i in self.seeded_layers(n_layer)}

    def check_for_model(self, n_layer: int) -> list[str]:
        """Raise ValueError if this configuration cannot act on a model of n_layer blocks; return warnings."""
        if self.layer_start >= n_layer:
            raise ValueError(
                f"fs.layer_start={self.layer_start} >= the model's {n_layer} layers: no layer would receive a seed "
                f"(this configuration would silently equal the baseline)"
            )
        gates = self.initial_gates(n_layer)
        warnings = []
        if max(gates.values()) < NOOP_GATE:
            warnings.append(
                f"every seeded layer starts with a gate below {NOOP_GATE:g} (max {max(gates.values()):.4g}): "
                f"close to a no-op{'' if self.trainable else ', and no gate is trainable'}"
            )
        return warnings
