"""Triton GPU kernels for the WKV-7 operator (forward and backward), chunked WY form on tensor cores.

Operator (per head, state S in RWKV's [value, key] layout, see kernels/reference.py):

    S_t = S_{t-1} · diag(exp(-exp(w_t))) + (S_{t-1} a_t) b_tᵀ + v_t k_tᵀ,    y_t = S_t r_t

Inside the kernels the state is kept transposed, H = Sᵀ ([key, value], fla's layout), so that value
columns of H evolve independently and can be split across programs. s0 / sT / ds0 / dsT are read and
written in RWKV's [value, key] layout; the transposition happens only in pointer arithmetic.

Chunked form. Split the sequence into chunks of C tokens (C = 16·2^m). Inside a chunk, with per-key
log decays g_t = -exp(w_t), inclusive cumulative sums G_t = Σ_{s<=t} g_s and G_{t-1} (exclusive), and
the chunk-start state H0, every quantity is a matrix product:

    SA   = Ã H0 + A_ab SA + A_ak V        rows sa_tᵀ = (S_{t-1} a_t)ᵀ      =>  SA = T (Ã H0 + A_ak V)
    Y    = R̃ H0 + A_rb SA + A_rk V
    H_C  = diag(γ) H0 + B̄ᵀ SA + K̄ᵀ V

    A_xy[t, s] = Σ_j x_tj y_sj exp(G_{t(-1),j} - G_sj)   (strictly lower for the a-rows, lower for r)
    Ã = a ⊙ e^{G_{t-1}},  R̃ = r ⊙ e^{G_t},  B̄ = b ⊙ e^{G_C - G_s},  K̄ = k ⊙ e^{G_C - G_s},  γ = e^{G_C}
    T = (I - A_ab)^{-1}  (A_ab is nilpotent: exact Neumann product (I+A)(I+A²)(I+A⁴)… on tensor cores)

which folds into  Y = Q H0 + Z  and  H_C = M H0 + E  with  W = T Ã,  Q = R̃ + A_rb W,
M = diag(γ) + B̄ᵀ W  (C×K and K×K, independent of H0, so computed for all chunks in parallel).

Kernels:
  forward   _fwd_chunk   (parallel over chunks)      M, E, Q, Z per chunk
            _fwd_scan    (sequential over chunks,    H_{c+1} = M_c H_c + E_c ; y = Q_c H_c + Z_c ;
                          parallel over value tiles)  saves H_c (fp32) for the backward, writes sT
  backward  _bwd_chunk   (parallel)                  M_c and P_c = Q_cᵀ dY_c
            _bwd_scan    (sequential, reverse)       dH_c = M_cᵀ dH_{c+1} + P_c ; writes ds0
            _bwd_grads   (parallel)                  recomputes the chunk from (H_c, dH_{c+1}) and
                                                     writes dr, dw, dk, dv, da, db

Numerical stability. The intra-chunk matrices need the relative decays exp(G_t - G_s), s <= t, which
are <= 1. They are computed as products of two factors referenced to the chunk's middle,
exp(G_t - G_mid) · exp(G_mid - G_s); each factor is bounded by exp((C/2)·max|g|). The state-side
factors (Ã, R̃, B̄, K̄, γ) are referenced to the chunk start or end and are all <= 1. So the kernels
rely on one bound: the per-step log decay satisfies |g| = exp(w) <= exp(W_MAX) = 2, i.e. w <= ln 2
(per-step decay >= e^-2 ≈ 0.135), which keeps every factor <= e^64 for chunks up to C = 64 (e^32 at
the default C = 32); fp32 holds up to e^88. RWKV-7 computes
w = -0.5 - softplus(·) < -0.5 (|g| < 0.607), far inside. The kernels clamp w at W_MAX (for larger w the
decay used is e^-2 instead of a smaller one, and dw is 0 there); `wkv7_triton(check_domain=True)`
(the default) raises instead of clamping silently. No division by a cumulative decay happens anywhere.

Precision. State, accumulators and every intermediate are fp32. Matrix products run on tensor cores in
TF32 for 16-bit inputs and in full fp32 ("ieee") for fp32 inputs.

Saved for the backward: the inputs (by reference) and the fp32 chunk-start states H_c, i.e.
4·D²/C bytes per token and head: 512 B at D=64 (C=32) against 768 B for the six bf16 inputs; 128 B
at D=32. At D=128 (C=32) it is 2048 B against 1536 B, i.e. more than the inputs (C=64 would halve it,
but the gradient kernel spills badly at C=64; see below).

Measured (NVIDIA H200, one run, bf16, s0 in, sT out, all gradients; triton.testing.do_bench medians;
fla 0.6.0 chunk_rwkv7 with chunk 64 / safe_gate in the same run), `python -m kernels.bench`:
    B8 T4096 H12 D64   fwd 0.918 ms (fla 0.921)   fwd+bwd 3.48 ms (fla 3.67)
    B16 T1024 H12 D64  fwd 0.474 ms (fla 0.954)   fwd+bwd 1.77 ms (fla 2.85)
    B4 T8192 H12 D64   fwd 1.13 ms  (fla 1.12)    fwd+bwd 3.86 ms (fla 4.17)
    B2 T4096 H32 D128  fwd 1.76 ms  (fla 1.60)    fwd+bwd 42.4 ms (gradient kernel spills; fla not reached)
Per kernel at B8 T4096 H12 D64 (ms): _fwd_chunk 0.56, _fwd_scan 0.40, _bwd_chunk 0.45, _bwd_scan 0.24,
_bwd_grads 1.82 (255 registers, ~380 spilled). At C=64 the scans drop to 0.23 / 0.12 ms, but the
parallel kernels spill more. What limits it now: register pressure in _bwd_grads (many live [C, D]
fp32 tiles), and the fp32 M/E/Q/Z/P intermediates the chunk kernels write and the scans read.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Largest w the kernels compute exactly: per-step log decay |g| = exp(w) <= 2 (see module docstring).
W_MAX = math.log(2.0)
SUPPORTED_HEAD_SIZES = (16, 32, 64, 128)


# ----------------------------------------------------------------------------------------------------
# shared device helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _token_tile(i_b, i_h, t0, T, H, D: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, c0):
    """Offsets and mask of a [BT tokens, BC channels] tile of a [B, T, H, D] tensor (channels c0..)."""
    rows = t0 + tl.arange(0, BT)
    cols = c0 + tl.arange(0, BC)
    offs = ((i_b.to(tl.int64) * T + rows[:, None]) * H + i_h) * D + cols[None, :]
    mask = (rows < T)[:, None] & (cols < D)[None, :]
    return offs, mask


@triton.jit
def _chunk_factors(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, i_b, i_h, t0, T, H,
                   D: tl.constexpr, BT: tl.constexpr, W_MAX: tl.constexpr):
    """Loads one chunk and returns the decay-scaled operands of the chunked form (all fp32, [BT, D]).

    m-suffixed operands are referenced to the chunk middle (for the intra-chunk matrices); the others
    to the chunk start/end (for the state terms). ea/er/eb and eR/eCR let callers rebuild the decays.
    """
    offs, mask = _token_tile(i_b, i_h, t0, T, H, D, BT, D, 0)
    valid = (t0 + tl.arange(0, BT)) < T
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    g = tl.where(valid[:, None], -tl.exp(tl.minimum(w, W_MAX)), 0.0)   # log decay per step
    G = tl.cumsum(g, axis=0)                                             # inclusive
    Gx = G - g                                                           # exclusive (G_{t-1})
    Gc = tl.sum(g, axis=0)                                               # whole chunk
    first_half = tl.arange(0, BT) < (BT // 2)
    R = tl.sum(tl.where(first_half[:, None], g, 0.0), axis=0)            # reference: chunk middle

    ea = tl.exp(Gx - R[None, :])
    er = tl.exp(G - R[None, :])
    eb = tl.exp(R[None, :] - G)
    eR = tl.exp(R)                  # [D], <= 1
    eCR = tl.exp(Gc - R)            # [D], <= 1
    return r, w, k, a, b, g, ea, er, eb, eR, eCR, Gc


@triton.jit
def _neumann_inverse(A, BT: tl.constexpr, LOG2_BT: tl.constexpr, PREC: tl.constexpr):
    """(I - A)^{-1} for strictly lower-triangular A [BT, BT]: (I+A)(I+A²)(I+A⁴)… exactly (A^BT = 0)."""
    rows = tl.arange(0, BT)[:, None]
    cols = tl.arange(0, BT)[None, :]
    Tm = tl.where(rows == cols, 1.0, 0.0) + A
    P = A
    for _ in tl.static_range(LOG2_BT - 1):
        P = tl.dot(P, P, input_precision=PREC)
        Tm = Tm + tl.dot(Tm, P, input_precision=PREC)
    return Tm


# ----------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_chunk_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, M_ptr, E_ptr, Q_ptr, Z_ptr,
                      T, H, NT,
                      D: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr, BV: tl.constexpr,
                      W_MAX: tl.constexpr, PREC: tl.constexpr):
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    t0 = i_c * BT

    r, w, k, a, b, g, ea, er, eb, eR, eCR, Gc = _chunk_factors(
        r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, i_b, i_h, t0, T, H, D, BT, W_MAX)
    a_m = a * ea
    r_m = r * er
    b_m = b * eb
    k_m = k * eb

    tr = tl.arange(0, BT)[:, None]
    ts = tl.arange(0, BT)[None, :]
    A_ab = tl.where(ts < tr, tl.dot(a_m, tl.trans(b_m), input_precision=PREC), 0.0)
    A_ak = tl.where(ts < tr, tl.dot(a_m, tl.trans(k_m), input_precision=PREC), 0.0)
    A_rb = tl.where(ts <= tr, tl.dot(r_m, tl.trans(b_m), input_precision=PREC), 0.0)
    A_rk = tl.where(ts <= tr, tl.dot(r_m, tl.trans(k_m), input_precision=PREC), 0.0)
    Tm = _neumann_inverse(A_ab, BT, LOG2_BT, PREC)

    a_s = a_m * eR[None, :]          # Ã = a e^{G_{t-1}}
    r_s = r_m * eR[None, :]          # R̃ = r e^{G_t}
    b_s = b_m * eCR[None, :]         # B̄ = b e^{G_C - G_s}
    k_s = k_m * eCR[None, :]         # K̄ = k e^{G_C - G_s}

    W = tl.dot(Tm, a_s, input_precision=PREC)         # [BT, D]
    TAk = tl.dot(Tm, A_ak, input_precision=PREC)      # [BT, BT]
    Q = r_s + tl.dot(A_rb, W, input_precision=PREC)   # [BT, D]
    QV = A_rk + tl.dot(A_rb, TAk, input_precision=PREC)
    kr = tl.arange(0, D)[:, None]
    kc = tl.arange(0, D)[None, :]
    M = tl.dot(tl.trans(b_s), W, input_precision=PREC) + tl.where(kr == kc, tl.exp(Gc)[:, None], 0.0)
    N = tl.trans(k_s) + tl.dot(tl.trans(b_s), TAk, input_precision=PREC)   # [D, BT]

    blk = i_bh.to(tl.int64) * NT + i_c
    tl.store(M_ptr + blk * D * D + kr * D + kc, M)
    tl.store(Q_ptr + blk * BT * D + tr * D + kc, Q)
    for iv in tl.static_range(D // BV):
        offs, mask = _token_tile(i_b, i_h, t0, T, H, D, BT, BV, iv * BV)
        vt = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vc = iv * BV + tl.arange(0, BV)[None, :]
        tl.store(E_ptr + blk * D * D + kr * D + vc, tl.dot(N, vt, input_precision=PREC))
        tl.store(Z_ptr + blk * BT * D + tr * D + vc, tl.dot(QV, vt, input_precision=PREC))


@triton.jit
def _fwd_scan_kernel(s0_ptr, M_ptr, E_ptr, Q_ptr, Z_ptr, y_ptr, h_ptr, sT_ptr,
                     T, H, NT,
                     D: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                     HAS_S0: tl.constexpr, SAVE_H: tl.constexpr, PREC: tl.constexpr):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    kr = tl.arange(0, D)[:, None]
    kc = tl.arange(0, D)[None, :]
    vc = i_v * BV + tl.arange(0, BV)[None, :]
    tr = tl.arange(0, BT)[:, None]
    state = i_bh.to(tl.int64) * D * D
    if HAS_S0:
        h = tl.load(s0_ptr + state + vc * D + kr)       # H[j, i] = s0[i, j]
    else:
        h = tl.zeros([D, BV], dtype=tl.float32)
    for c in range(NT):
        blk = i_bh.to(tl.int64) * NT + c
        if SAVE_H:
            tl.store(h_ptr + blk * D * D + kr * D + vc, h)
        q = tl.load(Q_ptr + blk * BT * D + tr * D + kc)
        z = tl.load(Z_ptr + blk * BT * D + tr * D + vc)
        yt = tl.dot(q, h, input_precision=PREC) + z
        offs, mask = _token_tile(i_b, i_h, c * BT, T, H, D, BT, BV, i_v * BV)
        tl.store(y_ptr + offs, yt.to(y_ptr.dtype.element_ty), mask=mask)
        m = tl.load(M_ptr + blk * D * D + kr * D + kc)
        e = tl.load(E_ptr + blk * D * D + kr * D + vc)
        h = tl.dot(m, h, input_precision=PREC) + e
    tl.store(sT_ptr + state + vc * D + kr, h)


# ----------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_chunk_kernel(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, dy_ptr, Mt_ptr, P_ptr,
                      T, H, NT,
                      D: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr, BV: tl.constexpr,
                      W_MAX: tl.constexpr, PREC: tl.constexpr):
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    t0 = i_c * BT

    r, w, k, a, b, g, ea, er, eb, eR, eCR, Gc = _chunk_factors(
        r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, i_b, i_h, t0, T, H, D, BT, W_MAX)
    a_m = a * ea
    r_m = r * er
    b_m = b * eb
    tr = tl.arange(0, BT)[:, None]
    ts = tl.arange(0, BT)[None, :]
    A_ab = tl.where(ts < tr, tl.dot(a_m, tl.trans(b_m), input_precision=PREC), 0.0)
    A_rb = tl.where(ts <= tr, tl.dot(r_m, tl.trans(b_m), input_precision=PREC), 0.0)
    Tm = _neumann_inverse(A_ab, BT, LOG2_BT, PREC)
    W = tl.dot(Tm, a_m * eR[None, :], input_precision=PREC)
    Q = r_m * eR[None, :] + tl.dot(A_rb, W, input_precision=PREC)
    kr = tl.arange(0, D)[:, None]
    kc = tl.arange(0, D)[None, :]
    Mt = tl.dot(tl.trans(W), b_m * eCR[None, :], input_precision=PREC) \
        + tl.where(kr == kc, tl.exp(Gc)[:, None], 0.0)           # M_cᵀ = Wᵀ B̄ + diag(γ)

    blk = i_bh.to(tl.int64) * NT + i_c
    tl.store(Mt_ptr + blk * D * D + kr * D + kc, Mt)
    for iv in tl.static_range(D // BV):
        offs, mask = _token_tile(i_b, i_h, t0, T, H, D, BT, BV, iv * BV)
        dyt = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vc = iv * BV + tl.arange(0, BV)[None, :]
        tl.store(P_ptr + blk * D * D + kr * D + vc, tl.dot(tl.trans(Q), dyt, input_precision=PREC))


@triton.jit
def _bwd_scan_kernel(dsT_ptr, Mt_ptr, P_ptr, dh_ptr, ds0_ptr,
                     NT,
                     D: tl.constexpr, BV: tl.constexpr, HAS_DST: tl.constexpr, PREC: tl.constexpr):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    kr = tl.arange(0, D)[:, None]
    kc = tl.arange(0, D)[None, :]
    vc = i_v * BV + tl.arange(0, BV)[None, :]
    state = i_bh.to(tl.int64) * D * D
    if HAS_DST:
        dh = tl.load(dsT_ptr + state + vc * D + kr)
    else:
        dh = tl.zeros([D, BV], dtype=tl.float32)
    for i in range(NT):
        c = NT - 1 - i
        blk = i_bh.to(tl.int64) * NT + c
        tl.store(dh_ptr + blk * D * D + kr * D + vc, dh)
        mt = tl.load(Mt_ptr + blk * D * D + kr * D + kc)       # M_cᵀ (stored transposed)
        p = tl.load(P_ptr + blk * D * D + kr * D + vc)
        dh = tl.dot(mt, dh, input_precision=PREC) + p
    tl.store(ds0_ptr + state + vc * D + kr, dh)


@triton.jit
def _bwd_grads_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr, h_ptr, dh_ptr,
                      dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr,
                      T, H, NT,
                      D: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr, BV: tl.constexpr,
                      W_MAX: tl.constexpr, PREC: tl.constexpr):
    """Recomputes one chunk from its start state H_c and end adjoint dH_{c+1}; writes all gradients.

    With dÃ = Δ H0ᵀ, dR̃ = dY H0ᵀ, dB̄ = SA dH_Cᵀ, dK̄ = V dH_Cᵀ, dA_ab = Δ SAᵀ, dA_ak = Δ Vᵀ,
    dA_rb = dY SAᵀ, dA_rk = dY Vᵀ (summed over value tiles), every input gradient is x-factor times
    an accumulator X: da = ea·Xa, dr = er·Xr, db = eb·Xb, dk = eb·Xk, with
      Xa = dA_ab b_m + dA_ak k_m + dÃ e^R       Xr = dA_rb b_m + dA_rk k_m + dR̃ e^R
      Xb = dA_abᵀ a_m + dA_rbᵀ r_m + dB̄ e^{G_C-R}  Xk = dA_akᵀ a_m + dA_rkᵀ r_m + dK̄ e^{G_C-R}
    and the log-decay gradient follows from dG_t = r_m Xr - b_m Xb - k_m Xk, dG_{t-1} = a_m Xa and
    dG_C = Σ_t (B̄ dB̄ + K̄ dK̄) + γ Σ_v dH_C H0. Only the X accumulators live across value tiles.
    """
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    t0 = i_c * BT

    r, w, k, a, b, g, ea, er, eb, eR, eCR, Gc = _chunk_factors(
        r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, i_b, i_h, t0, T, H, D, BT, W_MAX)
    a_m = a * ea
    r_m = r * er
    b_m = b * eb
    k_m = k * eb
    tr = tl.arange(0, BT)[:, None]
    ts = tl.arange(0, BT)[None, :]
    strict = ts < tr
    lower = ts <= tr
    A_ab = tl.where(strict, tl.dot(a_m, tl.trans(b_m), input_precision=PREC), 0.0)
    A_ak = tl.where(strict, tl.dot(a_m, tl.trans(k_m), input_precision=PREC), 0.0)
    A_rb = tl.where(lower, tl.dot(r_m, tl.trans(b_m), input_precision=PREC), 0.0)
    A_rk = tl.where(lower, tl.dot(r_m, tl.trans(k_m), input_precision=PREC), 0.0)
    Tm = _neumann_inverse(A_ab, BT, LOG2_BT, PREC)
    W = tl.dot(Tm, a_m * eR[None, :], input_precision=PREC)
    TAk = tl.dot(Tm, A_ak, input_precision=PREC)

    xa = tl.zeros([BT, D], dtype=tl.float32)
    xr = tl.zeros([BT, D], dtype=tl.float32)
    xb = tl.zeros([BT, D], dtype=tl.float32)
    xk = tl.zeros([BT, D], dtype=tl.float32)
    d_gc = tl.zeros([D], dtype=tl.float32)         # gradient of G_C (the whole chunk's log decay)
    kr = tl.arange(0, D)[:, None]
    blk = i_bh.to(tl.int64) * NT + i_c
    for iv in tl.static_range(D // BV):
        vc = iv * BV + tl.arange(0, BV)[None, :]
        h0 = tl.load(h_ptr + blk * D * D + kr * D + vc)        # state at chunk start [D, BV]
        dhc = tl.load(dh_ptr + blk * D * D + kr * D + vc)      # adjoint of the state at chunk end
        offs, mask = _token_tile(i_b, i_h, t0, T, H, D, BT, BV, iv * BV)
        vt = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dyt = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)

        sa = tl.dot(W, h0, input_precision=PREC) + tl.dot(TAk, vt, input_precision=PREC)
        x = tl.dot(tl.trans(A_rb), dyt, input_precision=PREC) \
            + tl.dot(b_m * eCR[None, :], dhc, input_precision=PREC)
        dlt = tl.dot(tl.trans(Tm), x, input_precision=PREC)    # Δ = Tᵀ (A_rbᵀ dY + B̄ dH_C)
        dvt = tl.dot(tl.trans(A_ak), dlt, input_precision=PREC) \
            + tl.dot(tl.trans(A_rk), dyt, input_precision=PREC) \
            + tl.dot(k_m * eCR[None, :], dhc, input_precision=PREC)
        tl.store(dv_ptr + offs, dvt.to(dv_ptr.dtype.element_ty), mask=mask)
        d_gc += tl.sum(dhc * h0, axis=1) * tl.exp(Gc)       # through γ = e^{G_C}

        h0t = tl.trans(h0)
        dhct = tl.trans(dhc)
        sat = tl.trans(sa)
        vtt = tl.trans(vt)
        dA = tl.where(strict, tl.dot(dlt, sat, input_precision=PREC), 0.0)          # dA_ab
        xa += tl.dot(dA, b_m, input_precision=PREC)
        xb += tl.dot(tl.trans(dA), a_m, input_precision=PREC)
        dA = tl.where(strict, tl.dot(dlt, vtt, input_precision=PREC), 0.0)          # dA_ak
        xa += tl.dot(dA, k_m, input_precision=PREC)
        xk += tl.dot(tl.trans(dA), a_m, input_precision=PREC)
        dA = tl.where(lower, tl.dot(dyt, sat, input_precision=PREC), 0.0)           # dA_rb
        xr += tl.dot(dA, b_m, input_precision=PREC)
        xb += tl.dot(tl.trans(dA), r_m, input_precision=PREC)
        dA = tl.where(lower, tl.dot(dyt, vtt, input_precision=PREC), 0.0)           # dA_rk
        xr += tl.dot(dA, k_m, input_precision=PREC)
        xk += tl.dot(tl.trans(dA), r_m, input_precision=PREC)
        xa += tl.dot(dlt, h0t, input_precision=PREC) * eR[None, :]                 # dÃ
        xr += tl.dot(dyt, h0t, input_precision=PREC) * eR[None, :]                 # dR̃
        xbs = tl.dot(sa, dhct, input_precision=PREC) * eCR[None, :]                # dB̄
        xks = tl.dot(vt, dhct, input_precision=PREC) * eCR[None, :]                # dK̄
        xb += xbs
        xk += xks
        d_gc += tl.sum(b_m * xbs + k_m * xks, axis=0)      # B̄ ⊙ dB̄ + K̄ ⊙ dK̄, summed over tokens

    offs, mask = _token_tile(i_b, i_h, t0, T, H, D, BT, D, 0)
    tl.store(da_ptr + offs, (ea * xa).to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(dr_ptr + offs, (er * xr).to(dr_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + offs, (eb * xb).to(db_ptr.dtype.element_ty), mask=mask)
    tl.store(dk_ptr + offs, (eb * xk).to(dk_ptr.dtype.element_ty), mask=mask)

    # log-decay gradient: every factor is x·exp(±G), so dG = ±x ⊙ dx; then undo the cumulative sums:
    # dg_t = Σ_{t'>=t} dG_t' + Σ_{t'>t} dG_{t'-1} + dG_C
    dGx = a_m * xa                                             # terms in G_{t-1}
    dGi = r_m * xr - b_m * xb - k_m * xk + dGx                 # terms in G_t, plus G_{t-1} ones
    dg = tl.sum(dGi, axis=0)[None, :] - tl.cumsum(dGi, axis=0) + dGi - dGx + d_gc[None, :]
    tl.store(dw_ptr + offs, tl.where(w <= W_MAX, dg * g, 0.0).to(dw_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------


# Launch parameters per head size: D=64 and D=128 picked per kernel from timings on an H200 (module
# docstring); D=16/32 are untuned. TUNING overrides entries (for tuning runs); keys: BT chunk, BV_chunk
# value tile of the parallel kernels,
# BV_fscan / BV_bscan value tiles of the scans, warps_*, stages_fscan / stages_bscan.
LAUNCH = {
    16: dict(BT=16, BV_chunk=16, BV_fscan=16, BV_bscan=16, warps_fchunk=4, warps_bchunk=4, warps_grads=4,
             warps_scan=4, stages_fscan=2, stages_bscan=2),
    32: dict(BT=32, BV_chunk=32, BV_fscan=32, BV_bscan=32, warps_fchunk=4, warps_bchunk=4, warps_grads=4,
             warps_scan=4, stages_fscan=2, stages_bscan=2),
    64: dict(BT=32, BV_chunk=64, BV_fscan=16, BV_bscan=16, warps_fchunk=4, warps_bchunk=4, warps_grads=4,
             warps_scan=4, stages_fscan=1, stages_bscan=1),
    128: dict(BT=32, BV_chunk=64, BV_fscan=64, BV_bscan=64, warps_fchunk=4, warps_bchunk=4, warps_grads=8,
              warps_scan=4, stages_fscan=1, stages_bscan=1),
}
TUNING: dict[int, dict] = {}


class _Config:
    """Launch shape for one call: chunk length, value tiles, precision, warps and pipeline stages."""

    def __init__(self, D: int, dtype: torch.dtype, chunk_size: int | None):
        if D not in SUPPORTED_HEAD_SIZES:
            raise ValueError(f"head size D={D} is not supported by the triton backend "
                             f"(supported: {SUPPORTED_HEAD_SIZES})")
        params = {**LAUNCH[D], **TUNING.get(D, {})}
        if chunk_size is not None:
            params["BT"] = chunk_size
        self.D = D
        self.BT = params["BT"]
        if self.BT < 16 or self.BT & (self.BT - 1):
            raise ValueError(f"chunk_size={self.BT} must be a power of two >= 16")
        self.LOG2_BT = int(math.log2(self.BT))
        self.BV_chunk = min(D, params["BV_chunk"])
        self.BV_fscan = min(D, params["BV_fscan"])
        self.BV_bscan = min(D, params["BV_bscan"])
        self.warps_fchunk = params["warps_fchunk"]
        self.warps_bchunk = params["warps_bchunk"]
        self.warps_grads = params["warps_grads"]
        self.warps_scan = params["warps_scan"]
        self.stages_fscan = params["stages_fscan"]
        self.stages_bscan = params["stages_bscan"]
        self.PREC = "ieee" if dtype == torch.float32 else "tf32"


def _check_inputs(r, w, k, v, a, b, s0):
    if r.dim() != 4:
        raise ValueError(f"r must be [B, T, H, D], got shape {tuple(r.shape)}")
    for name, x in (("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if x.shape != r.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(r.shape)} like r")
        if x.dtype != r.dtype:
            raise ValueError(f"{name} has dtype {x.dtype}, expected {r.dtype} like r")
    if r.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"inputs must be float32, bfloat16 or float16, got {r.dtype}")
    B, T, H, D = r.shape
    if T < 1:
        raise ValueError("T must be >= 1")
    if s0 is not None and tuple(s0.shape) != (B, H, D, D):
        raise ValueError(f"s0 has shape {tuple(s0.shape)}, expected {(B, H, D, D)}")


def _forward(r, w, k, v, a, b, s0, cfg: _Config, save_states: bool):
    B, T, H, D = r.shape
    BT = cfg.BT
    NT = triton.cdiv(T, BT)
    dev = r.device
    f32 = torch.float32
    M = torch.empty(B * H, NT, D, D, device=dev, dtype=f32)
    E = torch.empty(B * H, NT, D, D, device=dev, dtype=f32)
    Q = torch.empty(B * H, NT, BT, D, device=dev, dtype=f32)
    Z = torch.empty(B * H, NT, BT, D, device=dev, dtype=f32)
    _fwd_chunk_kernel[(NT, B * H)](
        r, w, k, v, a, b, M, E, Q, Z, T, H, NT,
        D=D, BT=BT, LOG2_BT=cfg.LOG2_BT, BV=cfg.BV_chunk, W_MAX=W_MAX, PREC=cfg.PREC,
        num_warps=cfg.warps_fchunk)
    y = torch.empty_like(r)
    sT = torch.empty(B, H, D, D, device=dev, dtype=f32)
    hbuf = torch.empty(B * H, NT, D, D, device=dev, dtype=f32) if save_states else M  # M: dummy
    s0_arg = s0 if s0 is not None else sT
    _fwd_scan_kernel[(D // cfg.BV_fscan, B * H)](
        s0_arg, M, E, Q, Z, y, hbuf, sT, T, H, NT,
        D=D, BT=BT, BV=cfg.BV_fscan, HAS_S0=s0 is not None, SAVE_H=save_states, PREC=cfg.PREC,
        num_warps=cfg.warps_scan, num_stages=cfg.stages_fscan)
    return y, sT, (hbuf if save_states else None)


def _backward(r, w, k, v, a, b, hbuf, dy, dsT, cfg: _Config):
    B, T, H, D = r.shape
    BT = cfg.BT
    NT = triton.cdiv(T, BT)
    dev = r.device
    f32 = torch.float32
    Mt = torch.empty(B * H, NT, D, D, device=dev, dtype=f32)
    P = torch.empty(B * H, NT, D, D, device=dev, dtype=f32)
    _bwd_chunk_kernel[(NT, B * H)](
        r, w, k, a, b, dy, Mt, P, T, H, NT,
        D=D, BT=BT, LOG2_BT=cfg.LOG2_BT, BV=cfg.BV_chunk, W_MAX=W_MAX, PREC=cfg.PREC,
        num_warps=cfg.warps_bchunk)
    dh = torch.empty(B * H, NT, D, D, device=dev, dtype=f32)
    ds0 = torch.empty(B, H, D, D, device=dev, dtype=f32)
    _bwd_scan_kernel[(D // cfg.BV_bscan, B * H)](
        dsT if dsT is not None else ds0, Mt, P, dh, ds0, NT,
        D=D, BV=cfg.BV_bscan, HAS_DST=dsT is not None, PREC=cfg.PREC,
        num_warps=cfg.warps_scan, num_stages=cfg.stages_bscan)
    del Mt, P
    dr, dw, dk, dv, da, db = (torch.empty_like(r) for _ in range(6))
    _bwd_grads_kernel[(NT, B * H)](
        r, w, k, v, a, b, dy, hbuf, dh, dr, dw, dk, dv, da, db, T, H, NT,
        D=D, BT=BT, LOG2_BT=cfg.LOG2_BT, BV=cfg.BV_chunk, W_MAX=W_MAX, PREC=cfg.PREC,
        num_warps=cfg.warps_grads)
    return dr, dw, dk, dv, da, db, ds0


class WKV7Triton(torch.autograd.Function):
    """Autograd wrapper: gradients for r, w, k, v, a, b and s0; accepts a gradient on sT."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, chunk_size):
        r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
        if s0 is not None:
            s0 = s0.to(torch.float32).contiguous()
        cfg = _Config(r.shape[-1], r.dtype, chunk_size)
        needs_grad = any(ctx.needs_input_grad[:7])
        y, sT, hbuf = _forward(r, w, k, v, a, b, s0, cfg, save_states=needs_grad)
        if needs_grad:
            ctx.save_for_backward(r, w, k, v, a, b, hbuf)
            ctx.cfg = cfg
            ctx.has_s0 = s0 is not None
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, hbuf = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()
        dsT = None if dsT is None else dsT.to(torch.float32).contiguous()
        dr, dw, dk, dv, da, db, ds0 = _backward(r, w, k, v, a, b, hbuf, dy, dsT, ctx.cfg)
        return dr, dw, dk, dv, da, db, (ds0 if ctx.has_s0 else None), None


def wkv7_triton(r, w, k, v, a, b, s0=None, *, chunk_size: int | None = None, check_domain: bool = True):
    """WKV-7 on the GPU (or under TRITON_INTERPRET=1 on CPU tensors): returns (y, sT).

    r, w, k, v, a, b: [B, T, H, D] (bf16, fp16 or fp32, all the same dtype), any T >= 1, D in
    SUPPORTED_HEAD_SIZES. s0: [B, H, D, D] in RWKV's [value, key] layout or None (zeros). y has the
    inputs' dtype; sT is fp32 [B, H, D, D], [value, key]. Differentiable in all seven inputs.

    The kernels compute exactly for w <= W_MAX (= ln 2; RWKV-7's w is < -0.5). With check_domain=True
    (default) a larger w raises ValueError; this costs one reduction over w and a host sync, so callers
    that guarantee the bound (the RWKV-7 model) pass check_domain=False, and w is then clamped at W_MAX.
    """
    _check_inputs(r, w, k, v, a, b, s0)
    if check_domain and bool((w.detach() > W_MAX).any()):
        raise ValueError(f"w must be <= {W_MAX:.4f} (ln 2) for the triton backend; "
                         f"got max {w.detach().max().item():.4f}")
    return WKV7Triton.apply(r, w, k, v, a, b, s0, chunk_size)
