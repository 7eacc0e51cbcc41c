"""fsearch: model.

Import-light: nothing here imports torch. The torch-side names below are resolved lazily on first access
(`from model import RWKV7` imports model.rwkv7 then); the torch-free configuration lives in model.config,
model.fs_config and model.candidates. (The FS function is `model.future_seed.future_seed`: the
name `model.future_seed` is the submodule.)
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RWKV7": "model.rwkv7",
    "LayerState": "model.rwkv7",
    "FSGates": "model.future_seed",
    "init_weights": "model.init",
    "load_blinkdl": "model.checkpoint",
    "save_blinkdl": "model.checkpoint",
    "load_hf": "model.checkpoint",
    "save_hf": "model.checkpoint",
    "save": "model.checkpoint",
    "load": "model.checkpoint",
    "load_any": "model.checkpoint",
    "Checkpoint": "model.checkpoint",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
