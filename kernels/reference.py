"""Per-step reference of the WKV-7 operator: the oracle every other backend is tested against.

Per head, with the state S in RWKV's [value, key] layout (fla's is the transpose):

    S_t = S_{t-1} · diag(exp(-exp(w_t))) + (S_{t-1} a_t) b_tᵀ + v_t k_tᵀ
    y_t = S_t r_t

Inputs r, w, k, v, a, b are [B, T, H, D]; s0 and the returned sT are [B, H, D, D]. The computation runs in
float64 when any input is float64 (the oracle, and gradcheck) and in float32 otherwise; y is returned in r's
dtype, sT in the compute dtype. Plain autograd through the loop gives every gradient, including s0's.
"""
from __future__ import annotations

import torch


def wkv7_reference(r, w, k, v, a, b, s0=None):
    B, T, H, D = r.shape
    out_dtype = r.dtype
    inputs = (r, w, k, v, a, b, s0)
    cdt = torch.float64 if any(x is not None and x.dtype == torch.float64 for x in inputs) else torch.float32
    r, w, k, v, a, b = (x.to(cdt) for x in (r, w, k, v, a, b))
    S = torch.zeros(B, H, D, D, dtype=cdt, device=r.device) if s0 is None else s0.to(cdt)
    decay = torch.exp(-torch.exp(w))  # [B, T, H, D], multiplies the key columns of S
    ys = []
    for t in range(T):
        sa = torch.einsum("bhvk,bhk->bhv", S, a[:, t])
        S = (S * decay[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        ys.append(torch.einsum("bhvk,bhk->bhv", S, r[:, t]))
    y = torch.stack(ys, dim=1)
    return y.to(out_dtype), S


W_MODEL_RANGE = (-4.0, -0.5)  # RWKV-7 computes w = -softplus(·) - 0.5 < -0.5, so decays exp(-exp(w)) lie in (0.545, 1)


def rwkv7_like_inputs(B, T, H, D, *, dtype=torch.float32, w_range=W_MODEL_RANGE, seed=0, with_state=True):
    """Operator inputs shaped like a RWKV-7 layer's: [r, w, k, v, a, b, s0].

    r, k, v ~ N(0, 1); a = -kk and b = kk·iclr with kk unit-norm per head and iclr ∈ (0, 1); w uniform in
    w_range; s0 ~ N(0, 0.5²) (None when with_state is False). Drawn in float64, then cast to dtype.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    r, k, v = randn(B, T, H, D), randn(B, T, H, D), randn(B, T, H, D)
    lo, hi = w_range
    w = lo + (hi - lo) * torch.rand(B, T, H, D, generator=g, dtype=torch.float64)
    kk = torch.nn.functional.normalize(randn(B, T, H, D), dim=-1)
    iclr = torch.rand(B, T, H, D, generator=g, dtype=torch.float64)
    s0 = 0.5 * randn(B, H, D, D) if with_state else None
    out = [x.to(dtype) for x in (r, w, k, v, -kk, kk * iclr)]
    return out + [None if s0 is None else s0.to(dtype)]
