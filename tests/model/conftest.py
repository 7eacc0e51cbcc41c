"""Shared fixtures for the model tests: small configs and models with realistic (non-degenerate) random weights."""
from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.init import init_weights
from model.rwkv7 import RWKV7

KERNEL = "reference"  # the per-step oracle: exact, and fast enough at these sizes


def small_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=257, n_layer=3, n_embd=64, head_size=16, tokenizer="byte",
                d_decay=16, d_aaa=16, d_mv=8, d_gate=24)
    base.update(overrides)
    return ModelConfig(**base)


def noisy_model(cfg: ModelConfig, seed: int = 0, noise: float = 0.3, kernel: str = KERNEL) -> RWKV7:
    """RWKV-7's own init plus noise on every tensor, so that the tensors the init zeroes (output, ffn.value, the
    first LoRA matrices) take part: matrices get N(0, (0.5/sqrt(fan_in))^2) noise, vectors N(0, noise^2)."""
    model = RWKV7(cfg, kernel=kernel)
    init_weights(model, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            scale = noise if p.dim() < 2 else 0.5 / p.shape[-1] ** 0.5
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def tokens(B: int, T: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def make_config():
    return small_config


@pytest.fixture
def make_model():
    return noisy_model


@pytest.fixture
def make_tokens():
    return tokens
