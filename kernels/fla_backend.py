"""Optional backend: flash-linear-attention's `chunk_rwkv7` (install with `pip install fsearch[fla]`).

fla is imported only when this backend runs, so fsearch works without it. Its conventions differ from ours in
two places, each converted by a small pure function below (and unit-tested on CPU against our reference):

- state layout: ours is RWKV's [B, H, V, K] (value, key); fla's initial/final state is [B, H, K, V], the transpose.
- decay: our w is RWKV's raw decay parameter, per-step decay exp(-exp(w)); fla's w is the log decay, so
  w_fla = -exp(w) (decay = exp(w_fla)).
- scale: fla scales r by `scale` (None would mean 1/sqrt(K)); RWKV-7 needs scale = 1.0.
- a, b: fla's DPLR vectors are exactly our a and b (the RWKV-7 layer passes a = -kk, b = kk·iclr).

In fla's convention, per head with S [K, V]:
    S_t = exp(w_fla_t)[:, None] · S_{t-1} + k_t v_tᵀ + b_t (a_tᵀ S_{t-1}),   o_t = S_tᵀ r_t,
which is our recurrence transposed. `fla_convention_recurrence` spells that out for the tests.
"""
from __future__ import annotations

import math

import torch

FLA_INSTALL_HINT = "pip install fsearch[fla]"
# fla's own RWKV-7 layer bounds the log decay to [-exp(-0.5), 0) and runs chunk_rwkv7 with these options: chunks of
# 64 and the tensor-core gate scheme. Without them fla falls back to chunks of 16 without that scheme, its slow path.
FLA_LOWER_BOUND = -math.exp(-0.5)
FLA_MODEL_RANGE_OPTIONS = {"safe_gate": True, "chunk_size": 64, "lower_bound": FLA_LOWER_BOUND}


def state_to_fla(s: torch.Tensor) -> torch.Tensor:
    """Our [B, H, V, K] state -> fla's [B, H, K, V]."""
    return s.transpose(-1, -2)


def state_from_fla(h: torch.Tensor) -> torch.Tensor:
    """fla's [B, H, K, V] state -> our [B, H, V, K]."""
    return h.transpose(-1, -2)


def w_to_fla(w: torch.Tensor) -> torch.Tensor:
    """Our raw decay parameter w (decay exp(-exp(w))) -> fla's log decay -exp(w)."""
    return -torch.exp(w)


def fla_convention_recurrence(r, w_fla, k, v, a, b, h0=None):
    """Per-step WKV-7 written in fla's conventions (log decay, [K, V] state, scale 1): (o, hT).

    A plain transcription of fla's recurrence, for checking the conversions without fla installed.
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    h = r.new_zeros(B, H, K, V) if h0 is None else h0.clone()
    outs = []
    for t in range(T):
        a_h = torch.einsum("bhk,bhkv->bhv", a[:, t], h)                          # aᵀ S_{t-1}
        h = (torch.exp(w_fla[:, t])[..., None] * h + k[:, t, ..., None] * v[:, t, :, None, :]
             + b[:, t, ..., None] * a_h[:, :, None, :])
        outs.append(torch.einsum("bhkv,bhk->bhv", h, r[:, t]))                     # S_tᵀ r_t
    return torch.stack(outs, dim=1), h


def load_chunk_rwkv7():
    """fla's chunk_rwkv7, or an ImportError that says how to install it."""
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError as e:
        raise ImportError(f"the 'fla' WKV-7 backend needs flash-linear-attention: {FLA_INSTALL_HINT} ({e})") from e
    return chunk_rwkv7


def wkv7_fla(r, w, k, v, a, b, s0=None, *, w_in_model_range: bool = False, **fla_kwargs):
    """WKV-7 through fla's chunk_rwkv7, in our conventions: (y [B, T, H, D] in r's dtype, sT fp32 [B, H, V, K]).

    `w_in_model_range=True` (every w < -0.5, so the log decay -exp(w) lies in [FLA_LOWER_BOUND, 0)) runs fla the
    way its own RWKV-7 layer does (FLA_MODEL_RANGE_OPTIONS); otherwise fla's general path (chunks of 16). Extra
    keyword arguments go to chunk_rwkv7 unchanged and take precedence.
    """
    chunk_rwkv7 = load_chunk_rwkv7()
    h0 = None if s0 is None else state_to_fla(s0).float().contiguous()
    options = (dict(FLA_MODEL_RANGE_OPTIONS) if w_in_model_range else {}) | fla_kwargs
    y, hT = chunk_rwkv7(r, w_to_fla(w), k, v, a, b, scale=1.0, initial_state=h0, output_final_state=True,
                        **options)
    return y.to(r.dtype), state_from_fla(hT)
