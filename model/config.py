"""Model configuration and from-scratch presets. Torch-free: the control plane validates specs with it."""
from __future__ import annotations

from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, model_validator


def _lora_rank(n_embd: int, factor: float, power: float) -> int:
    """RWKV-7's own rule for LoRA ranks: round(factor * C**power / 32) * 32, at least 32."""
    return max(32, int(round(factor * (n_embd**power) / 32)) * 32)


class ModelConfig(BaseModel):
    """Shape of an RWKV-7 "G1" model. LoRA ranks default to RWKV-7's formulas (C=768 gives 64/64/32/128)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int
    n_layer: int
    n_embd: int
    head_size: int = 64
    ffn_dim: int | None = None  # default 4 * n_embd
    d_decay: int | None = None  # w LoRA rank
    d_aaa: int | None = None  # a (in-context learning rate) LoRA rank
    d_mv: int | None = None  # value-residual LoRA rank
    d_gate: int | None = None  # output-gate LoRA rank
    norm_eps: float = 1e-5
    tokenizer: Literal["world", "byte"] = "world"

    @model_validator(mode="after")
    def _fill_and_check(self) -> "ModelConfig":
        for name in ("vocab_size", "n_layer", "n_embd", "head_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.head_size:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be a multiple of model.head_size ({self.head_size})")
        C = self.n_embd
        defaults = {
            "ffn_dim": 4 * C,
            "d_decay": _lora_rank(C, 1.8, 0.5),
            "d_aaa": _lora_rank(C, 1.8, 0.5),
            "d_mv": _lora_rank(C, 1.3, 0.5),
            "d_gate": _lora_rank(C, 0.6, 0.8),
        }
        for k, v in defaults.items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)
        return self

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def n_params(self) -> int:
        C, L, V, F = self.n_embd, self.n_layer, self.vocab_size, self.ffn_dim
        lora = 2 * C * (self.d_decay + self.d_aaa + self.d_mv + self.d_gate)
        per_layer = 4 * C * C + lora + 2 * C * F + 16 * C
        return 2 * V * C + L * per_layer


BYTE_VOCAB = 257  # id 0 = end-of-text/pad, id b+1 = byte b
WORLD_VOCAB = 65536

# From-scratch presets. `tiny` is the CPU demo size; `small` and `0.1b-shape` are for GPUs.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=BYTE_VOCAB, n_layer=4, n_embd=64, head_size=16, tokenizer="byte",
                        d_decay=16, d_aaa=16, d_mv=16, d_gate=32),
    "small": ModelConfig(vocab_size=BYTE_VOCAB, n_layer=6, n_embd=256, head_size=64, tokenizer="byte"),
    "0.1b-shape": ModelConfig(vocab_size=WORLD_VOCAB, n_layer=12, n_embd=768, head_size=64, tokenizer="world"),
}


PRESET_DESCRIPTIONS: dict[str, str] = {
    "tiny": "CPU demo size, byte tokenizer",
    "small": "a small GPU model, byte tokenizer",
    "0.1b-shape": "the RWKV-7 0.1B shape with the World vocabulary, from scratch (random weights)",
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


# The ModelConfig fields a spec may override on top of a preset (orchestrator.runconfig.ModelShape): the model's
# shape. Not vocab_size or tokenizer (they belong to the tokenizer the preset names) and not norm_eps.
SHAPE_FIELDS = ("n_layer", "n_embd", "head_size", "ffn_dim", "d_decay", "d_aaa", "d_mv", "d_gate")


def with_shape(base: ModelConfig, shape: Mapping[str, int] | None) -> ModelConfig:
    """`base` with some of its SHAPE_FIELDS replaced. Fields the base was built with explicitly stay unless
    overridden; fields it derived (ffn_dim = 4 * n_embd, the LoRA ranks from RWKV-7's formulas) are derived again
    from the new shape. ValueError, one line naming the field, on an unknown field or a shape that does not fit."""
    shape = {k: v for k, v in (shape or {}).items() if v is not None}
    for k, v in shape.items():
        if k not in SHAPE_FIELDS:
            raise ValueError(f"{k}: not a shape field; known: {', '.join(SHAPE_FIELDS)}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k}: must be a positive integer, got {v!r}")
    if not shape:
        return base
    data = {k: getattr(base, k) for k in base.model_fields_set}
    data.update(shape)
    n_embd, head_size = data["n_embd"], data.get("head_size", ModelConfig.model_fields["head_size"].default)
    if n_embd % head_size:
        field = "head_size" if "head_size" in shape else "n_embd"
        raise ValueError(f"{field}: head_size ({head_size}) must divide n_embd ({n_embd})")
    try:
        return ModelConfig(**data)
    except ValueError as e:  # pydantic's ValidationError: keep its first message, on one line
        errors = getattr(e, "errors", None)
        msg = errors()[0].get("msg", str(e)) if callable(errors) and errors() else str(e)
        raise ValueError(" ".join(str(msg).removeprefix("Value error, ").split())) from None


