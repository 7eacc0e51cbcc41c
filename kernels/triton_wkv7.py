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
    T = (I - A_ab)^{-1}  (A_ab is strictly lower triangular: inverted by block doubling on tensor cores)

which folds into  Y = Q H0 + Z  and  H_C = M H0 + E  with  W = T Ã,  Q = R̃ + A_rb W,
M = diag(γ) + B̄ᵀ W  (C×K and K×K, independent of H0, so computed for all chunks in parallel).

Kernels:
  forward   _fwd_chunk   (parallel over chunks)      M, E, Q, Z per chunk
            _fwd_scan    (sequential over chunks,    H_{c+1} = M_c H_c + E_c ; y = Q_c H_c + Z_c ;
                          parallel over value tiles)  saves H_c for the backward, writes sT
  backward  _bwd_chunk   (parallel; only when the     M_cᵀ and P_c = Q_cᵀ dY_c
                          forward did not keep M, Q)
            _bwd_scan    (sequential, reverse)       dH_c = M_cᵀ dH_{c+1} + P_c (P_c formed here from
                                                     the kept Q_c when reuse_factors); writes ds0
            _bwd_delta   (parallel over chunks)      recomputes the chunk from (H_c, dH_{c+1}): dv and
                                                     the per-token SA and Δ = Tᵀ (A_rbᵀ dY + B̄ dH_C)
            _bwd_grads   (parallel over chunks and   dr, dw, dk, da, db from SA, Δ, H_c, dH_{c+1}
                          key slices)

Time segments. The chunk range is cut into `segments_fwd` (`segments_bwd`) pieces; the scan of one
piece runs on a second, high-priority CUDA stream while the chunk kernels of the next piece run on the
current one (the state passes between pieces through sT / ds0). The results are bitwise the same for
any number of pieces; on CPU tensors (the interpreter) everything runs in order.

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

Precision. State, accumulators and the per-chunk arithmetic are fp32. Matrix products run on tensor
cores in TF32 for 16-bit inputs and in full fp32 ("ieee") for fp32 inputs, where every buffer is fp32.
For 16-bit inputs (LAUNCH switches, per head size):
  half_factors  M, Q (and Mᵀ) stored in fp16: they only enter TF32 products, which round them to the
                same 10 mantissa bits anyway (values are bounded by sums of |r|, |a|, |b| products).
  half_sums     E, Z stored in bf16 (range-safe, 8 mantissa bits): adds about one bf16 rounding to y
                and sT. Measured at D=64 (bf16, H100): ‖Δy‖/‖y‖ 2.0e-3 -> 2.35e-3, sT 4.6e-4 -> 1.7e-3,
                gradients about unchanged (max 3.0e-3); it saves about 0.05 ms of the forward. On at D=64.
  half_states   H_c, dH_c, SA, Δ in fp16: faster gradient kernel, but fp16's range (6e-5 .. 65504)
                does not suit adjoints of small losses. Off everywhere; kept for experiments.

Saved for the backward: the inputs (by reference), the fp32 chunk-start states H_c of every
`state_stride`-th chunk (default 2: 4·D²/(2C) bytes per token and head) and, with reuse_factors (on
for D <= 64), the fp16 factors M and Q (2·D²/C + 2·D bytes), so that the backward skips _bwd_chunk.
_bwd_delta_kernel takes the chunks in groups of state_stride and rebuilds the unsaved start states on
the way, H_{c+1} = γ H_c + B̄ᵀ SA + K̄ᵀ V (two more small products; the states go to a transient
buffer that _bwd_grads_kernel reads). At D=64, C=32: 256 + 256 + 128 = 640 B per token and head
against 768 B for the six bf16 inputs (896 B with state_stride 1). At D=128 (no reuse): 1024 B
against 1536 B. tests/kernels/test_triton.py measures this with saved-tensor hooks.

Timings against fla and the torch path, per card and per kernel, and what limits the kernels now:
docs/kernel_bench.md (`fsearch bench kernel`).
"""
from __future__ import annotations

import contextlib
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
                   D: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, c0, W_MAX: tl.constexpr):
    """Loads one chunk's key channels c0..c0+BC and returns the decay-scaled operands (fp32, [BT, BC]).

    Every quantity here is per key channel, so a program may take a slice of the channels.
    m-suffixed operands are referenced to the chunk middle (for the intra-chunk matrices); the others
    to the chunk start/end (for the state terms). ea/er/eb and eR/eCR let callers rebuild the decays.
    """
    offs, mask = _token_tile(i_b, i_h, t0, T, H, D, BT, BC, c0)
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
    eR = tl.exp(R)                  # [BC], <= 1
    eCR = tl.exp(Gc - R)            # [BC], <= 1
    return r, w, k, a, b, g, ea, er, eb, eR, eCR, Gc


@triton.jit
def _chunk_matrices(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, i_b, i_h, t0, T, H,
                    D: tl.constexpr, BT: tl.constexpr, W_MAX: tl.constexpr, PREC: tl.constexpr):
    """One whole chunk's middle-referenced operands and its four masked intra-chunk matrices
    (A_ab, A_ak strictly lower; A_rb, A_rk lower), plus what the state terms need (eR, eCR, Gc)."""
    r, w, k, a, b, g, ea, er, eb, eR, eCR, Gc = _chunk_factors(
        r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, i_b, i_h, t0, T, H, D, BT, D, 0, W_MAX)
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
    return a_m, r_m, b_m, k_m, eR, eCR, Gc, A_ab, A_ak, A_rb, A_rk


@triton.jit
def _unit_lower_inverse(A, BT: tl.constexpr, LOG2_BT: tl.constexpr, PREC: tl.constexpr):
    """(I - A)^{-1} for strictly lower-triangular A [BT, BT], by doubling: with T_s the block-diagonal
    inverse over blocks of s tokens, T_2s = T_s + T_s L_s T_s, where L_s keeps the entries of A that
    couple the two halves of each 2s-block. Every product involves inverse blocks (entries of the size
    of the true inverse's) and entries of A, so rounding stays at the level of one product. The Neumann
    product (I+A)(I+A²)(I+A⁴)… it replaces forms powers of A whose entries grow like binomial
    coefficients (up to ~3e8 at BT=32) when keys are aligned and the in-context rate is near 1, and
    lost all accuracy there in TF32 (relative error > 1 on repeated tokens)."""
    rows = tl.arange(0, BT)[:, None]
    cols = tl.arange(0, BT)[None, :]
    Tm = tl.where(rows == cols, 1.0, 0.0) + tl.where((rows // 2) == (cols // 2), A, 0.0)   # s = 1
    for lvl in tl.static_range(1, LOG2_BT):
        s = 1 << lvl
        Ls = tl.where(((rows // (2 * s)) == (cols // (2 * s))) & ((rows // s) != (cols // s)), A, 0.0)
        Tm = Tm + tl.dot(tl.dot(Tm, Ls, input_precision=PREC), Tm, input_precision=PREC)
    return Tm


@triton.jit
def _start_state(hs_ptr, hx_ptr, i_bh, c, NTS, NX, tile, D: tl.constexpr, STRIDE: tl.constexpr):
    """Tile `tile` (element offsets inside a D×D block) of the chunk-start state H_c, in fp32. The forward
    saved every STRIDE-th state (hs: NTS blocks per head); _bwd_delta_kernel rebuilt the others (hx: NX
    blocks per head, STRIDE - 1 per group of STRIDE chunks)."""
    sub = c % STRIDE
    if sub == 0:
        blk = i_bh.to(tl.int64) * NTS + c // STRIDE
        h = tl.load(hs_ptr + blk * D * D + tile).to(tl.float32)
    else:
        blk = i_bh.to(tl.int64) * NX + (c // STRIDE) * (STRIDE - 1) + sub - 1
        h = tl.load(hx_ptr + blk * D * D + tile).to(tl.float32)
    return h


# ----------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["C0"])
def _fwd_chunk_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, M_ptr, E_ptr, Q_ptr, Z_ptr,
                      T, H, NT, C0,
                      D: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr, BV: tl.constexpr,
                      W_MAX: tl.constexpr, PREC: tl.constexpr):
    i_c = tl.program_id(0) + C0
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    t0 = i_c * BT

    a_m, r_m, b_m, k_m, eR, eCR, Gc, A_ab, A_ak, A_rb, A_rk = _chunk_matrices(
        r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, i_b, i_h, t0, T, H, D, BT, W_MAX, PREC)
    tr = tl.arange(0, BT)[:, None]
    Tm = _unit_lower_inverse(A_ab, BT, LOG2_BT, PREC)

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
    tl.store(M_ptr + blk * D * D + kr * D + kc, M.to(M_ptr.dtype.element_ty))
    tl.store(Q_ptr + blk * BT * D + tr * D + kc, Q.to(Q_ptr.dtype.element_ty))
    for iv in tl.static_range(D // BV):
        offs, mask = _token_tile(i_b, i_h, t0, T, H, D, BT, BV, iv * BV)
        vt = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vc = iv * BV + tl.arange(0, BV)[None, :]
        e = tl.dot(N, vt, input_precision=PREC)
        z = tl.dot(QV, vt, input_precision=PREC)
        tl.store(E_ptr + blk * D * D + kr * D + vc, e.to(E_ptr.dtype.element_ty))
        tl.store(Z_ptr + blk * BT * D + tr * D + vc, z.to(Z_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["C0", "NC"])
def _fwd_scan_kernel(s0_ptr, M_ptr, E_ptr, Q_ptr, Z_ptr, y_ptr, h_ptr, sT_ptr,
                     T, H, NT, NTS, C0, NC,
                     D: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, STRIDE: tl.constexpr,
                     HAS_S0: tl.constexpr, SAVE_H: tl.constexpr, PREC: tl.constexpr):
    """H_{c+1} = M_c H_c + E_c and y = Q_c H_c + Z_c over the segment's chunks; with SAVE_H, the states
    H_c of every STRIDE-th chunk (c % STRIDE == 0) go to h_ptr[c // STRIDE] for the backward."""
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
    for c in range(C0, C0 + NC):
        blk = i_bh.to(tl.int64) * NT + c
        if SAVE_H:
            if c % STRIDE == 0:
                sblk = i_bh.to(tl.int64) * NTS + c // STRIDE
                tl.store(h_ptr + sblk * D * D + kr * D + vc, h.to(h_ptr.dtype.element_ty))
        q = tl.load(Q_ptr + blk * BT * D + tr * D + kc).to(tl.float32)
        z = tl.load(Z_ptr + blk * BT * D + tr * D + vc).to(tl.float32)
        yt = tl.dot(q, h, input_precision=PREC) + z
        offs, mask = _token_tile(i_b, i_h, c * BT, T, H, D, BT, BV, i_v * BV)
        tl.store(y_ptr + offs, yt.to(y_ptr.dtype.element_ty), mask=mask)
        m = tl.load(M_ptr + blk * D * D + kr * D + kc).to(tl.float32)
        e = tl.load(E_ptr + blk * D * D + kr * D + vc).to(tl.float32)
        h = tl.dot(m, h, input_precision=PREC) + e
    tl.store(sT_ptr + state + vc * D + kr, h)


# ----------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["C0"])
def _bwd_chunk_kernel(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, dy_ptr, Mt_ptr, P_ptr,
                      T, H, NT, C0,
                      D: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr, BV: tl.constexpr,
                      W_MAX: tl.constexpr, PREC: tl.constexpr):
    i_c = tl.program_id(0) + C0
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    t0 = i_c * BT

    r, w, k, a, b, g, ea, er, eb, eR, eCR, Gc = _chunk_factors(
        r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, i_b, i_h, t0, T, H, D, BT, D, 0, W_MAX)
    a_m = a * ea
    r_m = r * er
    b_m = b * eb
    tr = tl.arange(0, BT)[:, None]
    ts = tl.arange(0, BT)[None, :]
    A_ab = tl.where(ts < tr, tl.dot(a_m, tl.trans(b_m), input_precision=PREC), 0.0)
    A_rb = tl.where(ts <= tr, tl.dot(r_m, tl.trans(b_m), input_precision=PREC), 0.0)
    Tm = _unit_lower_inverse(A_ab, BT, LOG2_BT, PREC)
    W = tl.dot(Tm, a_m * eR[None, :], input_precision=PREC)
    Q = r_m * eR[None, :] + tl.dot(A_rb, W, input_precision=PREC)
    kr = tl.arange(0, D)[:, None]
    kc = tl.arange(0, D)[None, :]
    Mt = tl.dot(tl.trans(W), b_m * eCR[None, :], input_precision=PREC) \
        + tl.where(kr == kc, tl.exp(Gc)[:, None], 0.0)           # M_cᵀ = Wᵀ B̄ + diag(γ)

    blk = i_bh.to(tl.int64) * NT + i_c
    tl.store(Mt_ptr + blk * D * D + kr * D + kc, Mt.to(Mt_ptr.dtype.element_ty))
    for iv in tl.static_range(D // BV):
        offs, mask = _token_tile(i_b, i_h, t0, T, H, D, BT, BV, iv * BV)
        dyt = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vc = iv * BV + tl.arange(0, BV)[None, :]
        tl.store(P_ptr + blk * D * D + kr * D + vc, tl.dot(tl.trans(Q), dyt, input_precision=PREC))


@triton.jit(do_not_specialize=["C0", "NC"])
def _bwd_scan_kernel(dsT_ptr, M_ptr, P_ptr, Q_ptr, dy_ptr, dh_ptr, ds0_ptr,
                     T, H, NT, C0, NC,
                     D: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, HAS_DST: tl.constexpr,
                     FROM_FWD: tl.constexpr, PREC: tl.constexpr):
    """dH_c = M_cᵀ dH_{c+1} + P_c for c = C0+NC-1 down to C0, with P_c = Q_cᵀ dY_c.

    FROM_FWD: M_ptr / Q_ptr hold the forward's M_c and Q_c and P_c is formed here; otherwise M_ptr
    holds M_cᵀ and P_ptr P_c, both from _bwd_chunk_kernel.
    """
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    kr = tl.arange(0, D)[:, None]
    kc = tl.arange(0, D)[None, :]
    tr = tl.arange(0, BT)[:, None]
    vc = i_v * BV + tl.arange(0, BV)[None, :]
    state = i_bh.to(tl.int64) * D * D
    if HAS_DST:
        dh = tl.load(dsT_ptr + state + vc * D + kr)
    else:
        dh = tl.zeros([D, BV], dtype=tl.float32)
    for i in range(NC):
        c = C0 + NC - 1 - i
        blk = i_bh.to(tl.int64) * NT + c
        tl.store(dh_ptr + blk * D * D + kr * D + vc, dh.to(dh_ptr.dtype.element_ty))
        if FROM_FWD:
            m = tl.load(M_ptr + blk * D * D + kr * D + kc).to(tl.float32)
            q = tl.load(Q_ptr + blk * BT * D + tr * D + kc).to(tl.float32)
            offs, mask = _token_tile(i_b, i_h, c * BT, T, H, D, BT, BV, i_v * BV)
            dyt = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dh = tl.dot(tl.trans(m), dh, input_precision=PREC) \
                + tl.dot(tl.trans(q), dyt, input_precision=PREC)
        else:
            mt = tl.load(M_ptr + blk * D * D + kr * D + kc).to(tl.float32)
            p = tl.load(P_ptr + blk * D * D + kr * D + vc)
            dh = tl.dot(mt, dh, input_precision=PREC) + p
    tl.store(ds0_ptr + state + vc * D + kr, dh)


@triton.jit(do_not_specialize=["C0", "NC"])
def _bwd_delta_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr, hs_ptr, hx_ptr, dh_ptr,
                      dv_ptr, sa_ptr, dl_ptr,
                      T, H, NT, NTS, NX, C0, NC,
                      D: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr, BV: tl.constexpr,
                      STRIDE: tl.constexpr, W_MAX: tl.constexpr, PREC: tl.constexpr):
    """Recomputes a group of STRIDE chunks, one after the other, from the group's saved start state and
    each chunk's end adjoint dH_{c+1}; writes dv and, for _bwd_grads_kernel, the per-token state
    projections SA (rows sa_tᵀ = (S_{t-1} a_t)ᵀ) and their adjoints Δ = Tᵀ (A_rbᵀ dY + B̄ dH_C), both
    [BT, D] per chunk:
        SA = W H0 + (T A_ak) V,   dV = A_akᵀ Δ + A_rkᵀ dY + K̄ dH_C,
    and the start states the forward did not save, H_{c+1} = γ H_c + B̄ᵀ SA + K̄ᵀ V (= M_c H_c + E_c),
    into hx (the next chunk of the group reads them back after a barrier).
    """
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    c_first = C0 + tl.program_id(0) * STRIDE
    c_last = tl.minimum(c_first + STRIDE, C0 + NC)
    kr = tl.arange(0, D)[:, None]
    tr = tl.arange(0, BT)[:, None]
    for i_c in range(c_first, c_last):
        t0 = i_c * BT
        a_m, r_m, b_m, k_m, eR, eCR, Gc, A_ab, A_ak, A_rb, A_rk = _chunk_matrices(
            r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, i_b, i_h, t0, T, H, D, BT, W_MAX, PREC)
        Tm = _unit_lower_inverse(A_ab, BT, LOG2_BT, PREC)
        W = tl.dot(Tm, a_m * eR[None, :], input_precision=PREC)
        TAk = tl.dot(Tm, A_ak, input_precision=PREC)
        b_s = b_m * eCR[None, :]
        k_s = k_m * eCR[None, :]
        gamma = tl.exp(Gc)[:, None]
        sub_next = (i_c + 1) % STRIDE          # the next chunk's place in the group (0: not rebuilt here)
        xblk = i_bh.to(tl.int64) * NX + (i_c // STRIDE) * (STRIDE - 1) + sub_next - 1

        blk = i_bh.to(tl.int64) * NT + i_c
        for iv in tl.static_range(D // BV):
            vc = iv * BV + tl.arange(0, BV)[None, :]
            h0 = _start_state(hs_ptr, hx_ptr, i_bh, i_c, NTS, NX, kr * D + vc, D, STRIDE)   # chunk start
            dhc = tl.load(dh_ptr + blk * D * D + kr * D + vc).to(tl.float32)   # adjoint at chunk end
            offs, mask = _token_tile(i_b, i_h, t0, T, H, D, BT, BV, iv * BV)
            vt = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dyt = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)

            sa = tl.dot(W, h0, input_precision=PREC) + tl.dot(TAk, vt, input_precision=PREC)
            x = tl.dot(tl.trans(A_rb), dyt, input_precision=PREC) + tl.dot(b_s, dhc, input_precision=PREC)
            dlt = tl.dot(tl.trans(Tm), x, input_precision=PREC)
            dvt = tl.dot(tl.trans(A_ak), dlt, input_precision=PREC) \
                + tl.dot(tl.trans(A_rk), dyt, input_precision=PREC) \
                + tl.dot(k_s, dhc, input_precision=PREC)
            tl.store(dv_ptr + offs, dvt.to(dv_ptr.dtype.element_ty), mask=mask)
            tl.store(sa_ptr + blk * BT * D + tr * D + vc, sa.to(sa_ptr.dtype.element_ty))
            tl.store(dl_ptr + blk * BT * D + tr * D + vc, dlt.to(dl_ptr.dtype.element_ty))
            if i_c + 1 < c_last:
                h1 = gamma * h0 + tl.dot(tl.trans(b_s), sa, input_precision=PREC) \
                    + tl.dot(tl.trans(k_s), vt, input_precision=PREC)
                tl.store(hx_ptr + xblk * D * D + kr * D + vc, h1)
        tl.debug_barrier()      # the group's next chunk reads the state just written by other threads


@triton.jit(do_not_specialize=["C0"])
def _bwd_grads_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr, hs_ptr, hx_ptr, dh_ptr, sa_ptr, dl_ptr,
                      dr_ptr, dw_ptr, dk_ptr, da_ptr, db_ptr,
                      T, H, NT, NTS, NX, C0,
                      D: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      STRIDE: tl.constexpr, W_MAX: tl.constexpr, PREC: tl.constexpr):
    """Gradients of r, w, k, a, b for one chunk and key channels c0..c0+BK, from SA and Δ.

    With dÃ = Δ H0ᵀ, dR̃ = dY H0ᵀ, dB̄ = SA dH_Cᵀ, dK̄ = V dH_Cᵀ, dA_ab = Δ SAᵀ, dA_ak = Δ Vᵀ,
    dA_rb = dY SAᵀ, dA_rk = dY Vᵀ (contractions over the value channels), every input gradient is
    x-factor times an accumulator X: da = ea·Xa, dr = er·Xr, db = eb·Xb, dk = eb·Xk, with
      Xa = dA_ab b_m + dA_ak k_m + dÃ e^R       Xr = dA_rb b_m + dA_rk k_m + dR̃ e^R
      Xb = dA_abᵀ a_m + dA_rbᵀ r_m + dB̄ e^{G_C-R}  Xk = dA_akᵀ a_m + dA_rkᵀ r_m + dK̄ e^{G_C-R}
    and the log-decay gradient follows from dG_t = r_m Xr - b_m Xb - k_m Xk, dG_{t-1} = a_m Xa and
    dG_C = Σ_t (B̄ dB̄ + K̄ dK̄) + γ Σ_v dH_C H0. All of it is per key channel except the four [BT, BT]
    dA matrices, which every key slice recomputes (they are cheap); so the key channels split across
    programs and few [BT, BK] tiles are live at once.
    """
    i_c = tl.program_id(0) + C0
    i_k = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh % H
    t0 = i_c * BT
    c0 = i_k * BK

    tr = tl.arange(0, BT)[:, None]
    ts = tl.arange(0, BT)[None, :]
    kr = c0 + tl.arange(0, BK)[:, None]
    blk = i_bh.to(tl.int64) * NT + i_c
    dAab = tl.zeros([BT, BT], dtype=tl.float32)
    dAak = tl.zeros([BT, BT], dtype=tl.float32)
    dArb = tl.zeros([BT, BT], dtype=tl.float32)
    dArk = tl.zeros([BT, BT], dtype=tl.float32)
    xa = tl.zeros([BT, BK], dtype=tl.float32)       # dÃ = Δ H0ᵀ
    xr = tl.zeros([BT, BK], dtype=tl.float32)       # dR̃ = dY H0ᵀ
    xbs = tl.zeros([BT, BK], dtype=tl.float32)      # dB̄ = SA dH_Cᵀ
    xks = tl.zeros([BT, BK], dtype=tl.float32)      # dK̄ = V dH_Cᵀ
    d_state = tl.zeros([BK], dtype=tl.float32)      # Σ_v dH_C H0
    for iv in tl.static_range(D // BV):
        vc = iv * BV + tl.arange(0, BV)[None, :]
        offs, mask = _token_tile(i_b, i_h, t0, T, H, D, BT, BV, iv * BV)
        dlt = tl.load(dl_ptr + blk * BT * D + tr * D + vc).to(tl.float32)
        sa = tl.load(sa_ptr + blk * BT * D + tr * D + vc).to(tl.float32)
        vt = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dyt = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h0 = _start_state(hs_ptr, hx_ptr, i_bh, i_c, NTS, NX, kr * D + vc, D, STRIDE)     # [BK, BV]
        dhc = tl.load(dh_ptr + blk * D * D + kr * D + vc).to(tl.float32)
        sat = tl.trans(sa)
        vtt = tl.trans(vt)
        dAab += tl.dot(dlt, sat, input_precision=PREC)
        dAak += tl.dot(dlt, vtt, input_precision=PREC)
        dArb += tl.dot(dyt, sat, input_precision=PREC)
        dArk += tl.dot(dyt, vtt, input_precision=PREC)
        h0t = tl.trans(h0)
        dhct = tl.trans(dhc)
        xa += tl.dot(dlt, h0t, input_precision=PREC)
        xr += tl.dot(dyt, h0t, input_precision=PREC)
        xbs += tl.dot(sa, dhct, input_precision=PREC)
        xks += tl.dot(vt, dhct, input_precision=PREC)
        d_state += tl.sum(dhc * h0, axis=1)
    dAab = tl.where(ts < tr, dAab, 0.0)
    dAak = tl.where(ts < tr, dAak, 0.0)
    dArb = tl.where(ts <= tr, dArb, 0.0)
    dArk = tl.where(ts <= tr, dArk, 0.0)

    r, w, k, a, b, g, ea, er, eb, eR, eCR, Gc = _chunk_factors(
        r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, i_b, i_h, t0, T, H, D, BT, BK, c0, W_MAX)
    a_m = a * ea
    r_m = r * er
    b_m = b * eb
    k_m = k * eb
    offs, mask = _token_tile(i_b, i_h, t0, T, H, D, BT, BK, c0)

    xa = xa * eR[None, :] + tl.dot(dAab, b_m, input_precision=PREC) \
        + tl.dot(dAak, k_m, input_precision=PREC)
    tl.store(da_ptr + offs, (ea * xa).to(da_ptr.dtype.element_ty), mask=mask)
    dGx = a_m * xa                                             # terms in G_{t-1}
    xr = xr * eR[None, :] + tl.dot(dArb, b_m, input_precision=PREC) \
        + tl.dot(dArk, k_m, input_precision=PREC)
    tl.store(dr_ptr + offs, (er * xr).to(dr_ptr.dtype.element_ty), mask=mask)
    dGi = r_m * xr + dGx                                       # terms in G_t, plus G_{t-1} ones
    xbs = xbs * eCR[None, :]
    d_gc = tl.sum(b_m * xbs, axis=0) + d_state * tl.exp(Gc)   # gradient of G_C (whole chunk)
    xb = xbs + tl.dot(tl.trans(dAab), a_m, input_precision=PREC) \
        + tl.dot(tl.trans(dArb), r_m, input_precision=PREC)
    tl.store(db_ptr + offs, (eb * xb).to(db_ptr.dtype.element_ty), mask=mask)
    dGi -= b_m * xb
    xks = xks * eCR[None, :]
    d_gc += tl.sum(k_m * xks, axis=0)
    xk = xks + tl.dot(tl.trans(dAak), a_m, input_precision=PREC) \
        + tl.dot(tl.trans(dArk), r_m, input_precision=PREC)
    tl.store(dk_ptr + offs, (eb * xk).to(dk_ptr.dtype.element_ty), mask=mask)
    dGi -= k_m * xk

    # every factor is x·exp(±G), so dG = ±x ⊙ dx; then undo the cumulative sums:
    # dg_t = Σ_{t'>=t} dG_t' + Σ_{t'>t} dG_{t'-1} + dG_C
    dg = tl.sum(dGi, axis=0)[None, :] - tl.cumsum(dGi, axis=0) + dGi - dGx + d_gc[None, :]
    tl.store(dw_ptr + offs, tl.where(w <= W_MAX, dg * g, 0.0).to(dw_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------


# Launch parameters per head size (D=64 and D=128 picked from timings on an H200 and an H100, see the
# module docstring; D=16/32 untuned). TUNING overrides entries (for tuning runs). Keys:
#   BT chunk length; BV_chunk value tile of the chunk kernels; BV_fscan / BV_bscan value tiles of the
#   scans (stages_*: their pipelining depth); BV_delta value tile of _bwd_delta_kernel; BK_grads /
#   BV_grads key slice per program and value tile of _bwd_grads_kernel; warps_* per kernel;
#   segments_fwd / segments_bwd time pieces whose scans overlap the chunk kernels; reuse_factors: the
#   forward keeps M, Q for the backward (no _bwd_chunk_kernel, more saved memory); half_factors /
#   half_sums / half_states: 16-bit buffers for 16-bit inputs (module docstring, "Precision").
def _untuned(n: int) -> dict:
    """Launch parameters of a head size without timings of its own: every tile the head size, 4 warps, one time
    piece, 16-bit factors only."""
    return dict(BT=n, BV_chunk=n, BV_fscan=n, BV_bscan=n, BV_delta=n, BK_grads=n, BV_grads=n,
                warps_fchunk=4, warps_bchunk=4, warps_delta=4, warps_grads=4, warps_fscan=4, warps_bscan=4,
                stages_fscan=2, stages_bscan=2, half_factors=True, half_sums=False, half_states=False,
                segments_fwd=1, segments_bwd=1, reuse_factors=True, state_stride=2)


LAUNCH = {
    16: _untuned(16),
    32: _untuned(32),
    64: dict(BT=32, BV_chunk=64, BV_fscan=32, BV_bscan=16, BV_delta=64, BK_grads=64, BV_grads=64,
             warps_fchunk=4, warps_bchunk=4, warps_delta=4, warps_grads=4, warps_fscan=4, warps_bscan=4,
             stages_fscan=2, stages_bscan=2, half_factors=True, half_sums=True, half_states=False,
             segments_fwd=4, segments_bwd=1, reuse_factors=True, state_stride=2),
    128: dict(BT=32, BV_chunk=64, BV_fscan=64, BV_bscan=64, BV_delta=16, BK_grads=32, BV_grads=32,
              warps_fchunk=4, warps_bchunk=4, warps_delta=4, warps_grads=4, warps_fscan=4, warps_bscan=4,
              stages_fscan=1, stages_bscan=1, half_factors=True, half_sums=False, half_states=False,
              segments_fwd=4, segments_bwd=4, reuse_factors=False, state_stride=2),
}
TUNING: dict[int, dict] = {}


class _Config:
    """Launch shape for one call: chunk length, tiles, precision, buffer dtypes, warps and stages."""

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
        for key in ("BV_chunk", "BV_fscan", "BV_bscan", "BV_delta", "BK_grads", "BV_grads"):
            setattr(self, key, min(D, params[key]))
        for key in ("warps_fchunk", "warps_bchunk", "warps_delta", "warps_grads", "warps_fscan", "warps_bscan",
                    "stages_fscan", "stages_bscan"):
            setattr(self, key, params[key])
        full = dtype == torch.float32
        self.PREC = "ieee" if full else "tf32"
        # 16-bit inputs: the TF32 products round their operands to 10 mantissa bits, so the
        # multiplicative factors M, Q, Mᵀ lose nothing in fp16; additive terms (E, Z, P) stay fp32
        self.factor_dtype = torch.float16 if params["half_factors"] and not full else torch.float32
        self.state_dtype = torch.float16 if params["half_states"] and not full else torch.float32
        self.sum_dtype = torch.bfloat16 if params["half_sums"] and not full else torch.float32
        self.segments_fwd = params["segments_fwd"]
        self.segments_bwd = params["segments_bwd"]
        self.reuse_factors = params["reuse_factors"]
        self.state_stride = params["state_stride"]
        if self.state_stride < 1:
            raise ValueError(f"state_stride={self.state_stride} must be >= 1")


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


def _segments(NT: int, n: int, align: int = 1) -> list[tuple[int, int]]:
    """(first chunk, number of chunks) of at most n contiguous, nearly equal pieces of range(NT), each
    starting at a multiple of `align` (the backward's groups of STRIDE chunks never straddle two pieces)."""
    n = max(1, min(n, NT))
    bounds = sorted({min(NT, -(-(NT * i // n) // align) * align) for i in range(n + 1)})
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(len(bounds) - 1)]


_SIDE_STREAMS: dict = {}


class _Overlap:
    """A second CUDA stream for the sequential scans, so that the scan of one time segment runs while
    the chunk-parallel kernels work on another. On CPU tensors (the interpreter) all runs in order."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled and device.type == "cuda"
        if self.enabled:
            self.main = torch.cuda.current_stream(device)
            if device not in _SIDE_STREAMS:
                _SIDE_STREAMS[device] = torch.cuda.Stream(device, priority=-1)
            self.side = _SIDE_STREAMS[device]

    @contextlib.contextmanager
    def side_after_main(self):
        """Launches inside run on the side stream, after everything queued on the main one so far."""
        if not self.enabled:
            yield
            return
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            yield

    def mark_side(self):
        """An event after everything queued on the side stream so far (None when not overlapping)."""
        if not self.enabled:
            return None
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def main_waits(self, event=None):
        """Work queued on the main stream from now on runs after `event` (default: all side work)."""
        if self.enabled:
            if event is None:
                self.main.wait_stream(self.side)
            else:
                self.main.wait_event(event)


def _forward(r, w, k, v, a, b, s0, cfg: _Config, save_states: bool):
    """y, sT and, when save_states, what the backward needs: (H_c, M, Q) or (H_c, None, None)."""
    B, T, H, D = r.shape
    BT = cfg.BT
    NT = triton.cdiv(T, BT)
    dev = r.device
    f32 = torch.float32
    M = torch.empty(B * H, NT, D, D, device=dev, dtype=cfg.factor_dtype)
    E = torch.empty(B * H, NT, D, D, device=dev, dtype=cfg.sum_dtype)
    Q = torch.empty(B * H, NT, BT, D, device=dev, dtype=cfg.factor_dtype)
    Z = torch.empty(B * H, NT, BT, D, device=dev, dtype=cfg.sum_dtype)
    y = torch.empty_like(r)
    sT = torch.empty(B, H, D, D, device=dev, dtype=f32)
    S = cfg.state_stride
    NTS = triton.cdiv(NT, S)
    hbuf = torch.empty(B * H, NTS, D, D, device=dev, dtype=cfg.state_dtype) if save_states else sT  # dummy
    segments = _segments(NT, cfg.segments_fwd)
    overlap = _Overlap(dev, len(segments) > 1)
    for i, (c0, nc) in enumerate(segments):
        _fwd_chunk_kernel[(nc, B * H)](
            r, w, k, v, a, b, M, E, Q, Z, T, H, NT, c0,
            D=D, BT=BT, LOG2_BT=cfg.LOG2_BT, BV=cfg.BV_chunk, W_MAX=W_MAX, PREC=cfg.PREC,
            num_warps=cfg.warps_fchunk)
        # the state passes from one segment to the next through sT (each program reads and writes
        # only its own value tile)
        state_in = sT if i > 0 or s0 is None else s0
        with overlap.side_after_main():
            _fwd_scan_kernel[(D // cfg.BV_fscan, B * H)](
                state_in, M, E, Q, Z, y, hbuf, sT, T, H, NT, NTS, c0, nc,
                D=D, BT=BT, BV=cfg.BV_fscan, STRIDE=S, HAS_S0=i > 0 or s0 is not None, SAVE_H=save_states,
                PREC=cfg.PREC, num_warps=cfg.warps_fscan, num_stages=cfg.stages_fscan)
    overlap.main_waits()
    if not save_states:
        return y, sT, None
    return y, sT, ((hbuf, M, Q) if cfg.reuse_factors else (hbuf, None, None))


def _backward(r, w, k, v, a, b, saved, dy, dsT, cfg: _Config):
    B, T, H, D = r.shape
    BT = cfg.BT
    NT = triton.cdiv(T, BT)
    dev = r.device
    f32 = torch.float32
    hbuf, M, Q = saved
    from_fwd = M is not None          # the forward kept M and Q: no _bwd_chunk_kernel
    if not from_fwd:
        M = torch.empty(B * H, NT, D, D, device=dev, dtype=cfg.factor_dtype)       # holds M_cᵀ
        P = torch.empty(B * H, NT, D, D, device=dev, dtype=f32)
        Q = P                                                                      # unused
    else:
        P = M                                                                      # unused
    dh = torch.empty(B * H, NT, D, D, device=dev, dtype=cfg.state_dtype)
    ds0 = torch.empty(B, H, D, D, device=dev, dtype=f32)
    dr, dw, dk, dv, da, db = (torch.empty_like(r) for _ in range(6))
    SA = torch.empty(B * H, NT, BT, D, device=dev, dtype=cfg.state_dtype)
    DL = torch.empty(B * H, NT, BT, D, device=dev, dtype=cfg.state_dtype)
    S = cfg.state_stride
    NTS = triton.cdiv(NT, S)
    NX = NTS * (S - 1)                                   # start states rebuilt by _bwd_delta_kernel
    hx = torch.empty(B * H, max(NX, 1), D, D, device=dev, dtype=f32)
    segments = _segments(NT, cfg.segments_bwd, S)[::-1]  # last segment first
    overlap = _Overlap(dev, len(segments) > 1)
    scanned = []
    for i, (c0, nc) in enumerate(segments):
        if not from_fwd:
            _bwd_chunk_kernel[(nc, B * H)](
                r, w, k, a, b, dy, M, P, T, H, NT, c0,
                D=D, BT=BT, LOG2_BT=cfg.LOG2_BT, BV=cfg.BV_chunk, W_MAX=W_MAX, PREC=cfg.PREC,
                num_warps=cfg.warps_bchunk)
        adjoint_in = ds0 if i > 0 or dsT is None else dsT    # the adjoint passes on through ds0
        with overlap.side_after_main():
            _bwd_scan_kernel[(D // cfg.BV_bscan, B * H)](
                adjoint_in, M, P, Q, dy, dh, ds0, T, H, NT, c0, nc,
                D=D, BT=BT, BV=cfg.BV_bscan, HAS_DST=i > 0 or dsT is not None, FROM_FWD=from_fwd,
                PREC=cfg.PREC, num_warps=cfg.warps_bscan, num_stages=cfg.stages_bscan)
            scanned.append(overlap.mark_side())
    for i, (c0, nc) in enumerate(segments):
        overlap.main_waits(scanned[i])
        _bwd_delta_kernel[(triton.cdiv(nc, S), B * H)](
            r, w, k, v, a, b, dy, hbuf, hx, dh, dv, SA, DL, T, H, NT, NTS, NX, c0, nc,
            D=D, BT=BT, LOG2_BT=cfg.LOG2_BT, BV=cfg.BV_delta, STRIDE=S, W_MAX=W_MAX, PREC=cfg.PREC,
            num_warps=cfg.warps_delta)
        _bwd_grads_kernel[(nc, D // cfg.BK_grads, B * H)](
            r, w, k, v, a, b, dy, hbuf, hx, dh, SA, DL, dr, dw, dk, da, db, T, H, NT, NTS, NX, c0,
            D=D, BT=BT, BK=cfg.BK_grads, BV=cfg.BV_grads, STRIDE=S, W_MAX=W_MAX, PREC=cfg.PREC,
            num_warps=cfg.warps_grads)
    overlap.main_waits()
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
        y, sT, saved = _forward(r, w, k, v, a, b, s0, cfg, save_states=needs_grad)
        if needs_grad:
            ctx.save_for_backward(r, w, k, v, a, b, *saved)
            ctx.cfg = cfg
            ctx.has_s0 = s0 is not None
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, *saved = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()
        dsT = None if dsT is None else dsT.to(torch.float32).contiguous()
        dr, dw, dk, dv, da, db, ds0 = _backward(r, w, k, v, a, b, saved, dy, dsT, ctx.cfg)
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
