"""Chunked WKV-7 in plain torch: the CPU path. wkv7_torch takes one of two routes:

    WKV7Chunked    an autograd.Function with an explicit backward, whenever an autograd graph is built;
    wkv7_forward   a forward-only path otherwise (torch.no_grad(), inference_mode, no input requiring grad), on CPU.

Per head, with S in RWKV's [value, key] layout (see kernels/reference.py for the per-step form):

    S_t = S_{t-1} (D_t + a_t b_tᵀ) + v_t k_tᵀ,   D_t = diag(d_t),  d_t = exp(-exp(w_t)),   y_t = S_t r_t

The sequence is cut into chunks of C tokens (C a power of two; T is zero-padded internally to a multiple of C,
a padded step being the identity: d = 1, k = v = a = b = 0). Inside a chunk, with the chunk's start state S0,
L_i = Σ_{τ≤i} log d_τ (chunk-local, L_{-1} = 0) and sa_i = S_{i-1} a_i (the rows of SA):

    SA = ag S0ᵀ + A_ab SA + A_ak V          →  SA = W S0ᵀ + TA V,   W = Tinv ag,  TA = Tinv A_ak,  Tinv = (I-A_ab)⁻¹
    Y  = rg S0ᵀ + A_rb SA + A_rk V          =  Qm S0ᵀ + G V,        Qm = rg + A_rb W,  G = A_rk + A_rb TA
    S_end = S0 diag(g) + SAᵀ bt + Vᵀ kt     =  S0 M + N,            M = diag(g) + Wᵀ bt,  N = Vᵀ (kt + TAᵀ bt)

with rg_i = r_i e^{L_i}, ag_i = a_i e^{L_{i-1}}, kt_j = k_j e^{L_{C-1} - L_j}, bt_j likewise, g = e^{L_{C-1}}, and
the decay-weighted matrices (x ∈ {r, a} on the rows, y ∈ {k, b} on the columns):

    A_ry[i, j] = Σ_κ r_iκ y_jκ e^{L_iκ - L_jκ}  (j ≤ i),    A_ay[i, j] = Σ_κ a_iκ y_jκ e^{L_{i-1}κ - L_jκ}  (j < i).

Only the chunk-to-chunk recurrence S0 → S0 M + N is sequential (one small matmul per chunk); the rest is batched.

Numerical stability: no cumulative decay product is ever divided by. Every factor is e^{L_p - L_q} with q ≤ p,
taken from a difference of chunk-local log-decay sums, so it lies in (0, 1]. The matrices A are built by a binary
split of the chunk: at level s (s = 1, 2, ..., C/2) every block of 2s tokens pairs its right half (rows i) with
its left half (columns j) through the anchor m, the last token of the left half:
e^{L_i - L_j} = e^{L_i - L_m} · e^{L_m - L_j}, both factors ≤ 1. Each level is then one batched matmul. The
diagonal (s = 0) needs no decay at all. (I - A_ab) is unit lower triangular and nilpotent below the diagonal,
so its inverse is the finite product (I + A)(I + A²)(I + A⁴)···.

The backward recomputes the chunk-local quantities from the inputs and the chunk-start states saved by the forward
(saved memory: one D×D state per chunk and head), runs the reverse recurrence dS0 = dS_end Mᵀ + dYᵀ Qm, and then
forms every gradient chunk-parallel. Decay gradients use the identity that, for a term x_i y_j e^{L_i - L_j}, the
gradient on L_i is x_i ∂/∂x_i and on L_j it is -y_j ∂/∂y_j.

Computation runs in float32 (float64 for float64 inputs); y is returned in r's dtype, sT in the compute dtype.
Precision: the decay factors are 2^(difference of chunk-local cumulative sums of μ = exp(w)/ln 2), so their relative
error is about the float32 spacing of C·max μ: ~2e-6 in the RWKV-7 range (w < -0.5), ~1e-5 at w = 1.5 (measured
errors of y and of all gradients against the float64 reference stay below ~3e-6 for w in [-3, 1.5]).

Forward only (wkv7_forward): no backward to feed, so neither the binary split nor the matrices M, N are needed.
 * The decay span of a chunk is bounded instead: C is halved until C·max μ ≤ SPAN_MAX = 40 (log2 units), so every
   e^{±L_i} lies in [2^-40, 2^40] and e^{L_i - L_j} = e^{L_i}·e^{-L_j} splits into a row and a column factor: the
   four A matrices are one matmul [ag; rg]·[k e^{-L}; b e^{-L}]ᵀ, then masked. The error is that of the exponents,
   as with the split (measured ≤ 4e-7 relative for y and sT in fp32, w from [-9, -8] to [2.5, 3.3]). The RWKV-7
   range (w < -0.5, μ < 0.875) keeps C = 32, w = 1.5 gives C = 4; past w ≈ 3.3 (one step spans more than 40) the
   forward of WKV7Chunked runs instead.
 * [W | TA] = (I - A_ab)⁻¹ [ag | A_ak]: Neumann inverses of 16-token diagonal blocks, block forward substitution.
 * The state passes through SA, three small ops per chunk on the B·H heads (with Y' = rg S0ᵀ + A_rk V):

       [Y'; SA] = [A_rk V; TA V] + [rg; W] S0ᵀ,     S_endᵀ = g∘S0ᵀ + ktᵀ V + btᵀ SA,     Y = Y' + A_rb SA

   which skips forming M and N (2·C·D² flops each per chunk); the M-form loop (one op per chunk, measured too) is
   slower here once M and N are paid for.
 * Scratch is cut from one flat buffer kept per thread on CPU (WORKSPACE_BYTES; longer inputs run in groups of
   chunks that fit it, the state passed along): fresh multi-MB allocations each call cost page faults that, on the
   VM below, at times exceeded the arithmetic (~1000 faults, 1.3 ms of system time per call).

Measured on the project's 2-core AMD EPYC VM (KVM, Zen 5, AVX-512; shared with other jobs), B1 T512 H4 D64 fp32,
`python -m kernels.bench_cpu` (forward = no_grad): forward 1.4-2.0 ms with 2 threads, wall clock (WKV7Chunked's
forward before: 2.6-3.7 ms; per-step reference 22-27 ms): 12-16x the reference. One thread, CPU time: 2.3-3.3 ms
(before 4.4-7 ms; reference 20-23 ms): 6.5-9x. A quiet-machine profile (2 threads, ~1.45 ms): decay and scaling
passes 0.31 ms, A 0.19, the solve 0.22, the batched products with V 0.21, the 16-step loop 0.41 (48 small ops),
Y and the output copy 0.08. The arithmetic is ~141 Mflop (A 33.5, solve ~16, [A_rk; TA]·V 16.8, ktᵀV 16.8, loop
50.3, A_rb·SA 8.4); these batched matmuls run at ~95 Gflop/s per core (90-100 measured, 1024² sgemm 107), so one
thread needs ≥ 1.5 ms for the matmuls alone, and 20x the reference (≤ 1.1-1.35 ms) would need ~130 Gflop/s
sustained on two threads including the elementwise passes and the sequential loop.
"""
from __future__ import annotations

import math
import threading

import torch
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK = 32  # tokens per chunk, a power of two (T is padded to a multiple internally)
LOG2E = 1.0 / math.log(2.0)  # e^x = 2^(x·LOG2E); exp2 is much faster than exp on CPU
LN2 = math.log(2.0)



class Slot:
    """Slots of the chunk-major input buffer [N, C, 6, D]. (r, a) and (k, b) sit side by side, so the row and
    column operands of the decay-weighted matrices are plain views; MU holds the decay rate μ."""
    R, A, K, B, MU, V = range(6)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (gradcheck), float32 otherwise (fp16/bf16/fp32 inputs)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def effective_chunk(T: int, chunk: int) -> int:
    """The chunk actually used: `chunk`, shrunk to the next power of two ≥ T for short sequences."""
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk size must be a power of two, got {chunk}")
    return min(chunk, 1 << max(T - 1, 0).bit_length())


def decay_rate(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """μ = exp(w) / ln 2 ≥ 0: the per-step decay in log2 units, d = exp(-exp(w)) = 2^-μ."""
    return torch.exp2(w.to(dtype) * LOG2E + math.log2(LOG2E))


# ----------------------------------------------------------------------------------------------------------------
# layout: [B, T, H, D] <-> chunk-major [N, C, slots, D] with N = NC·B·H (chunk index outermost)
# ----------------------------------------------------------------------------------------------------------------

class _Layout:
    def __init__(self, B: int, T: int, H: int, D: int, chunk: int):
        self.B, self.T, self.H, self.D = B, T, H, D
        self.C = effective_chunk(T, chunk)
        self.NC = -(-T // self.C)
        self.Tp = self.NC * self.C
        self.BH = B * H
        self.N = self.NC * self.BH

    def to_chunks(self, xs, dtype) -> torch.Tensor:
        """Stack [B, T, H, D] tensors into one zero-padded chunk-major buffer [N, C, len(xs), D]."""
        B, H, C, NC, D = self.B, self.H, self.C, self.NC, self.D
        alloc = torch.empty if self.Tp == self.T else torch.zeros
        buf = alloc(NC, B, H, C, len(xs), D, dtype=dtype, device=xs[0].device)
        dst = buf.permute(1, 0, 3, 2, 4, 5)                                    # [B, NC, C, H, n, D] view
        full = self.T // C                                                     # chunks without padding
        for j, x in enumerate(xs):
            if full:
                dst[:, :full, :, :, j].copy_(x[:, :full * C].reshape(B, full, C, H, D))
            if full < NC:
                dst[:, full, :self.T - full * C, :, j].copy_(x[:, full * C:])
        return buf.view(self.N, C, len(xs), D)

    def from_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, *rest] -> [B, T, H, *rest] (a copy)."""
        B, H, C, NC = self.B, self.H, self.C, self.NC
        rest = x.shape[2:]
        x = x.view(NC, B, H, C, *rest).permute(1, 0, 3, 2, *range(4, 4 + len(rest)))   # [B, NC, C, H, ...]
        x = x.reshape(B, self.Tp, H, *rest)
        return x[:, :self.T]


# ----------------------------------------------------------------------------------------------------------------
# decay-weighted intra-chunk matrices by a binary split of the chunk
# ----------------------------------------------------------------------------------------------------------------

class _Level:
    """Operands of split level s: the rows i of every right half and the columns j of every left half.

    The row operands are (r'_i, a_i) = (r_i d_i, a_i), both scaled by fx_i = e^{L_{i-1} - L_m}; the column operands
    (k_j, b_j) are scaled by fy_j = e^{L_m - L_j}. xt, yt: [N·P, 2s, K] with rows (x, i) and (y, j); their product
    is the level's [2s, 2s] block of [[A_rk, A_rb], [A_ak, A_ab]] for every parent block (P = C / 2s per chunk).
    At s = 1 both factors are 1 (i - 1 = m = j) and are left out.
    """

    def __init__(self, Lc, Lx, RAd, KB, s: int):
        N, C, K = Lc.shape
        P = C // (2 * s)
        self.s, self.P = s, P
        x_i = RAd.view(N, P, 2, s, 2, K)[:, :, 1].transpose(2, 3)          # [N, P, 2, s, K]
        y_j = KB.view(N, P, 2, s, 2, K)[:, :, 0].transpose(2, 3)
        self.xt = Lc.new_empty(N, P, 2, s, K)
        self.yt = Lc.new_empty(N, P, 2, s, K)
        if s == 1:
            self.fx = self.fy = None
            self.xt.copy_(x_i)
            self.yt.copy_(y_j)
        else:
            anchor = Lc.view(N, P, 2, s, K)[:, :, 0, -1:]                   # Λ_m (Λ = -L / ln 2, nondecreasing)
            self.fx = torch.sub(anchor, Lx.view(N, P, 2, s, K)[:, :, 1]).exp2_().unsqueeze(2)
            self.fy = torch.sub(Lc.view(N, P, 2, s, K)[:, :, 0], anchor).exp2_().unsqueeze(2)
            torch.mul(x_i, self.fx, out=self.xt)
            torch.mul(y_j, self.fy, out=self.yt)
        self.xt = self.xt.view(N * P, 2 * s, K)
        self.yt = self.yt.view(N * P, 2 * s, K)

    def blocks(self, A: torch.Tensor) -> torch.Tensor:
        """This level's blocks of A [N, 2, C, 2, C] (x, i, y, j) as a view [N, P, 2, s, 2, s]."""
        N, s, P = A.shape[0], self.s, self.P
        C = 2 * s * P
        v = A.view(N, 2, P, 2, s, 2, P, 2, s).diagonal(dim1=2, dim2=6)      # [N, x, ih, i, y, jh, j, P]
        return v[:, :, 1, :, :, 0].permute(0, 5, 1, 2, 3, 4)


def _levels(Lc, Lx, RAd, KB):
    """The split levels s = 1, 2, 4, ..., C/2 of a chunk, lazily (the forward keeps none of them alive)."""
    C = Lc.shape[1]
    s = 1
    while s < C:
        yield _Level(Lc, Lx, RAd, KB, s)
        s *= 2


def _build_A(levels, RA, KB) -> torch.Tensor:
    """The four decay-weighted matrices as [N, 2C, 2C] = [[A_rk, A_rb], [A_ak, A_ab]].

    Only the entries the recurrence uses are written (j ≤ i for the r-rows, j < i for the a-rows); the rest stay 0.
    """
    N, C = RA.shape[:2]
    A = RA.new_zeros(N, 2, C, 2, C)
    for lv in levels:
        lv.blocks(A).copy_(torch.bmm(lv.xt, lv.yt.transpose(1, 2)).view(N, lv.P, 2, lv.s, 2, lv.s))
    # the diagonal: A_rk[i, i] = r_i·k_i and A_rb[i, i] = r_i·b_i (no decay between a token and itself)
    A[:, 0].diagonal(dim1=1, dim2=3).copy_((RA[:, :, :1] * KB).sum(-1).transpose(1, 2))
    return A.view(N, 2 * C, 2 * C)


def _build_A_backward(dA, levels, RA, KB, dRAd, dKB) -> torch.Tensor:
    """Gradient through _build_A given dA = ∂loss/∂A [N, 2C, 2C]: accumulated into dRAd (w.r.t. (r d, a)) and
    dKB (w.r.t. (k, b)); the diagonal's gradient w.r.t. r is returned ([N, C, K])."""
    N, C, _, K = RA.shape
    dA5 = dA.view(N, 2, C, 2, C)
    for lv in levels:
        s, P = lv.s, lv.P
        g = lv.blocks(dA5).reshape(N * P, 2 * s, 2 * s)                     # rows (x, i), columns (y, j)
        if s == 1:  # 2×2 blocks: two broadcast products beat a batched matmul of tiny matrices
            dxt = torch.addcmul(g[:, :, :1] * lv.yt[:, :1], g[:, :, 1:], lv.yt[:, 1:]).view(N, P, 2, s, K)
            dyt = torch.addcmul(g[:, :1, :].mT * lv.xt[:, :1], g[:, 1:, :].mT, lv.xt[:, 1:]).view(N, P, 2, s, K)
        else:
            dxt = torch.bmm(g, lv.yt).view(N, P, 2, s, K)
            dyt = torch.bmm(g.transpose(1, 2), lv.xt).view(N, P, 2, s, K)
        dx = dRAd.view(N, P, 2, s, 2, K)[:, :, 1].transpose(2, 3)
        dy = dKB.view(N, P, 2, s, 2, K)[:, :, 0].transpose(2, 3)
        if lv.fx is None:
            dx.add_(dxt)
            dy.add_(dyt)
        else:
            dx.addcmul_(dxt, lv.fx)
            dy.addcmul_(dyt, lv.fy)
    gd = dA5[:, 0].diagonal(dim1=1, dim2=3).transpose(1, 2).unsqueeze(-1)    # [N, C, 2, 1]: dA_rk[i,i], dA_rb[i,i]
    dKB.addcmul_(gd, RA[:, :, :1])
    return (gd * KB).sum(2)


# Diagonal blocks up to this size are inverted by the Neumann product, larger ones by doubling (or, in the forward-only
# path, block substitution). The product forms powers of L whose entries grow like binomial coefficients when keys
# repeat and the in-context rate is near 1 (L ~ -1 below the diagonal): with 16-blocks (L⁸, entries up to 6435) the
# error on such inputs was 1.5e-6 to 3.1e-6 in fp32, with 8-blocks (L⁴, up to 35) 2e-7 to 3e-7, as on generic inputs,
# at no measurable cost (CPU, B1 T512 H4 D64).
NEUMANN_BLOCK = 8


def _unit_lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """(I - L)⁻¹ for strictly lower triangular L [N, C, C].

    Diagonal blocks of size ≤ NEUMANN_BLOCK: the finite Neumann product (I + L)(I + L²)(I + L⁴)··· (L^C = 0).
    Then doubling: with X⁻¹, Y⁻¹ the inverses of the two diagonal halves of a block, its lower-left block is
    Y⁻¹ L[Y, X] X⁻¹.
    """
    N, C = L.shape[0], L.shape[-1]
    c = min(C, NEUMANN_BLOCK)
    Lb = L.reshape(N, C // c, c, C // c, c).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(-1, c, c)
    inv = Lb + torch.eye(c, dtype=L.dtype, device=L.device)
    P = Lb
    s = 2
    while s < c:
        P = torch.bmm(P, P)
        inv = torch.baddbmm(inv, inv, P)
        s *= 2
    if c == C:
        return inv
    Tinv = L.new_zeros(N, C, C)
    Tinv.view(N, C // c, c, C // c, c).diagonal(dim1=1, dim2=3).copy_(inv.view(N, C // c, c, c).permute(0, 2, 3, 1))
    s = c
    while s < C:
        P = C // (2 * s)
        blocks = Tinv.view(N, P, 2, s, P, 2, s).diagonal(dim1=1, dim2=4)    # [N, ih, i, jh, j, P]
        x_inv = blocks[:, 0, :, 0].permute(0, 3, 1, 2)
        y_inv = blocks[:, 1, :, 1].permute(0, 3, 1, 2)
        lower = L.view(N, P, 2, s, P, 2, s).diagonal(dim1=1, dim2=4)[:, 1, :, 0].permute(0, 3, 1, 2)
        blocks[:, 1, :, 0].copy_(torch.matmul(torch.matmul(y_inv, lower), x_inv).permute(0, 2, 3, 1))
        s *= 2
    return Tinv


# ----------------------------------------------------------------------------------------------------------------
# the chunk-parallel part, shared by forward and backward (the backward recomputes it)
# ----------------------------------------------------------------------------------------------------------------

class _Intra:
    """Chunk-local quantities for the chunk-major input buffer X [N, C, 6, D] (see Slot)."""

    def __init__(self, X: torch.Tensor, keep_levels: bool = False):
        N, C, _, K = X.shape
        self.C = C
        self.RA = X[:, :, Slot.R:Slot.A + 1]                                 # (r, a) [N, C, 2, K]
        self.KB = X[:, :, Slot.K:Slot.B + 1]                                 # (k, b)
        self.mu, self.v = X[:, :, Slot.MU], X[:, :, Slot.V]
        self.Lc = Lc = self.mu.cumsum(1)                                      # Λ_i = -L_i / ln 2 ≥ 0
        self.Lx = Lx = Lc - self.mu                                           # Λ_{i-1}
        self.d = torch.neg(self.mu).exp2_()                                   # d_i = e^{L_i - L_{i-1}}
        self.gex = torch.neg(Lx).exp2_()                                      # e^{L_{i-1}}
        self.grev = torch.sub(Lc, Lc[:, -1:]).exp2_()                        # e^{L_{C-1} - L_j}
        self.g = torch.neg(Lc[:, -1]).exp2_()                                 # e^{L_{C-1}}
        self.RAd = X.new_empty(N, C, 2, K)                                    # (r_i d_i, a_i)
        torch.mul(self.RA[:, :, 0], self.d, out=self.RAd[:, :, 0])
        self.RAd[:, :, 1] = self.RA[:, :, 1]
        RAg = self.RAd * self.gex.unsqueeze(2)                                # (rg, ag) = (r e^{L_i}, a e^{L_{i-1}})
        self.KBt = self.KB * self.grev.unsqueeze(2)                           # (kt, bt)
        self.rg, self.ag = RAg[:, :, 0], RAg[:, :, 1]
        self.kt, self.bt = self.KBt[:, :, 0], self.KBt[:, :, 1]
        levels = _levels(Lc, Lx, self.RAd, self.KB)
        if keep_levels:  # the backward reuses them
            levels = self.levels = list(levels)
        self.A = A = _build_A(levels, self.RA, self.KB)
        self.A_rk, self.A_rb = A[:, :C, :C], A[:, :C, C:]
        self.A_ak, self.A_ab = A[:, C:, :C], A[:, C:, C:]
        self.Tinv = _unit_lower_inverse(self.A_ab)
        self.TA = torch.bmm(self.Tinv, self.A_ak)
        self.W = torch.bmm(self.Tinv, self.ag)
        self.Qm = torch.baddbmm(self.rg, self.A_rb, self.W)                   # Y = Qm S0ᵀ + G V

    def output_matrix(self) -> torch.Tensor:
        """G = A_rk + A_rb TA [N, C, C]: Y0 = G V is the chunk's output from a zero start state."""
        return torch.baddbmm(self.A_rk, self.A_rb, self.TA)

    def transition(self):
        """(M, Nm) with S_end = S0 M + Nm: M = diag(g) + Wᵀ bt [N, K, K], Nm = Vᵀ (kt + TAᵀ bt) [N, V, K]."""
        M = torch.bmm(self.W.transpose(1, 2), self.bt)
        M.diagonal(dim1=1, dim2=2).add_(self.g)
        kt2 = torch.baddbmm(self.kt, self.TA.transpose(1, 2), self.bt)
        Nm = torch.bmm(self.v.transpose(1, 2), kt2)
        return M, Nm


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------

class WKV7Chunked(torch.autograd.Function):
    """y, sT = WKV7Chunked.apply(r, w, k, v, a, b, s0, chunk); s0 must be a tensor (zeros when absent)."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, chunk):
        with torch.autocast(r.device.type, enabled=False):  # the matmuls stay in the compute dtype
            return WKV7Chunked._forward(ctx, r, w, k, v, a, b, s0, chunk)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dsT):
        with torch.autocast(dy.device.type, enabled=False):
            return WKV7Chunked._backward(ctx, dy, dsT)

    @staticmethod
    def _forward(ctx, r, w, k, v, a, b, s0, chunk):
        B, T, H, D = r.shape
        cdt = compute_dtype(r, w, k, v, a, b, s0)
        lay = _Layout(B, T, H, D, chunk)
        X = lay.to_chunks((r, a, k, b, decay_rate(w, cdt), v), cdt)
        intra = _Intra(X)
        M, Nm = intra.transition()
        M = M.view(lay.NC, lay.BH, D, D)
        Nm = Nm.view(lay.NC, lay.BH, D, D)
        states = X.new_empty(lay.NC + 1, lay.BH, D, D)                        # chunk-start states, then sT
        states[0].copy_(s0.reshape(lay.BH, D, D))
        S, Ms, Ns = states.unbind(0), M.unbind(0), Nm.unbind(0)
        for c in range(lay.NC):
            torch.baddbmm(Ns[c], S[c], Ms[c], out=S[c + 1])
        S0 = states[:-1].view(lay.N, D, D)
        Y = torch.bmm(intra.output_matrix(), intra.v)
        Y.baddbmm_(intra.Qm, S0.transpose(1, 2))
        y = lay.from_chunks(Y).to(r.dtype).contiguous()
        sT = states[-1].view(B, H, D, D).clone()
        ctx.save_for_backward(r, w, k, v, a, b, states)
        ctx.lay, ctx.cdt, ctx.s0_dtype = lay, cdt, s0.dtype
        return y, sT

    @staticmethod
    def _backward(ctx, dy, dsT):
        r, w, k, v, a, b, states = ctx.saved_tensors
        lay, cdt = ctx.lay, ctx.cdt
        B, H, D, C, NC, N, BH = lay.B, lay.H, lay.D, lay.C, lay.NC, lay.N, lay.BH
        X = lay.to_chunks((r, a, k, b, decay_rate(w, cdt), v), cdt)
        it = _Intra(X, keep_levels=True)
        M, _ = it.transition()
        S0 = states[:-1].view(N, D, D)
        dY = lay.to_chunks((dy,), cdt)[:, :, 0]                               # [N, C, V]

        # reverse recurrence: dS0_c = dS_end_c M_cᵀ + dY_cᵀ Qm_c and dS_end_{c-1} = dS0_c
        Pc = torch.bmm(dY.transpose(1, 2), it.Qm).view(NC, BH, D, D)
        Mt = M.view(NC, BH, D, D).transpose(2, 3)
        dS = X.new_empty(NC + 1, BH, D, D)                                     # dS[c + 1] = dS_end of chunk c
        if dsT is None:
            dS[NC].zero_()
        else:
            dS[NC].copy_(dsT.reshape(BH, D, D))
        dSs, Mts, Pcs = dS.unbind(0), Mt.unbind(0), Pc.unbind(0)
        for c in range(NC - 1, -1, -1):
            torch.baddbmm(Pcs[c], dSs[c + 1], Mts[c], out=dSs[c])
        ds0 = dS[0].view(B, H, D, D).to(ctx.s0_dtype)
        dSE = dS[1:].view(N, D, D)

        # chunk-parallel gradients, through SA = W S0ᵀ + TA V (rows sa_i = S_{i-1} a_i) and Z = (I - A_ab) SA
        SA = torch.bmm(it.TA, it.v).baddbmm_(it.W, S0.transpose(1, 2))
        dSA = torch.bmm(it.bt, dSE.transpose(1, 2)).baddbmm_(it.A_rb.transpose(1, 2), dY)
        DZ = torch.cat((dY, torch.bmm(it.Tinv.transpose(1, 2), dSA)), dim=1)   # rows (x, i): [dY; dZ]
        VS = torch.cat((it.v, SA), dim=1)                                       # rows (y, j): [V; SA]
        dA = torch.bmm(DZ, VS.transpose(1, 2))                                  # [[dA_rk, dA_rb], [dA_ak, dA_ab]]
        dX = torch.empty_like(X)
        dRA, dKB = dX[:, :, Slot.R:Slot.A + 1], dX[:, :, Slot.K:Slot.B + 1]
        dRAd = X.new_empty(N, C, 2, D)                                         # w.r.t. (r d, a)
        torch.mul(torch.bmm(DZ, S0).view(N, 2, C, D).transpose(1, 2), it.gex.unsqueeze(2), out=dRAd)
        d_ktbt = torch.bmm(VS, dSE).view(N, 2, C, D).transpose(1, 2)           # d(kt, bt)
        torch.mul(d_ktbt, it.grev.unsqueeze(2), out=dKB)
        dX[:, :, Slot.V] = torch.bmm(it.kt, dSE.transpose(1, 2)).baddbmm_(it.A[:, :, :C].transpose(1, 2), DZ)
        dr_diag = _build_A_backward(dA, it.levels, it.RA, it.KB, dRAd, dKB)
        torch.addcmul(dr_diag, dRAd[:, :, 0], it.d, out=dRA[:, :, 0])
        dRA[:, :, 1] = dRAd[:, :, 1]

        # log-decay: gradient on L_i (dL) and on L_{i-1} (dLx); dℓ_τ = Σ_{i≥τ} dL_i + Σ_{i>τ} dLx_i
        xdx = it.RA * dRA
        dL = xdx[:, :, 0] - (it.KB * dKB).sum(2)
        dLx = xdx[:, :, 1]
        tail = (it.KBt * d_ktbt).sum((1, 2)) + it.g * (S0 * dSE).sum(1)         # through L_{C-1} (kt, bt, g)
        suffix = torch.ones(C, C, dtype=cdt, device=X.device).triu_()                # suffix sums as one matmul
        dell = torch.matmul(suffix, dL.add_(dLx)).sub_(dLx).add_(tail.unsqueeze(1))
        torch.mul(dell, it.mu, out=dX[:, :, Slot.MU]).mul_(-LN2)                      # dw = dℓ · ℓ, ℓ = -μ ln 2
        g = lay.from_chunks(dX)                                                  # [B, T, H, 6, D]
        dr, da, dk, db, dw, dv = (g[:, :, :, i].to(x.dtype) for i, x in zip(range(6), (r, a, k, b, w, v)))
        return dr, dw, dk, dv, da, db, ds0, None


# ----------------------------------------------------------------------------------------------------------------
# forward only (no autograd graph): direct factorisation of the decay, state passing through SA
# ----------------------------------------------------------------------------------------------------------------

SPAN_MAX = 40.0  # largest decay span Λ_{C-1} (log2 units) of a forward-only chunk: factors 2^±Λ within 2^±40
WORKSPACE_BYTES = 64 << 20  # scratch of the forward-only path: one group of chunks fits it; kept per thread on CPU

_TLS = threading.local()
_CONSTANTS: dict = {}


def forward_chunk(T: int, chunk: int, w_max: float) -> int:
    """The chunk C of the forward-only path: `chunk` (a power of two), shrunk to the next power of two ≥ T and
    until C·μ_max ≤ SPAN_MAX (μ_max = e^w_max / ln 2); 0 when even one step spans more (the stable path runs)."""
    C = effective_chunk(T, chunk)
    if not w_max < 700.0:  # NaN, or a decay that no chunk can hold
        return 0
    mu_max = math.exp(w_max) * LOG2E
    while C >= 1 and C * mu_max > SPAN_MAX:
        C //= 2
    return C


def _constants(C: int, c0: int, dtype: torch.dtype, device: torch.device) -> dict:
    key = (C, c0, dtype, device)
    if key not in _CONSTANTS:
        incl = torch.ones(C, C, dtype=dtype, device=device).tril_()
        _CONSTANTS[key] = {"incl": incl, "strict": incl.tril(-1), "eye": torch.eye(c0, dtype=dtype, device=device),
                           "strict_block": incl[:c0, :c0].tril(-1),
                           "log2_log2e": torch.tensor(math.log2(LOG2E), dtype=dtype, device=device)}
    return _CONSTANTS[key]


class _Arena:
    """Scratch tensors cut in order from one flat buffer; on CPU the buffer is kept per thread between calls
    (fresh large allocations cost page faults that can exceed the arithmetic)."""

    ALIGN = 16  # elements

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        if device.type == "cpu" and numel * torch.finfo(dtype).bits // 8 <= WORKSPACE_BYTES:
            cache = getattr(_TLS, "buffers", None)
            if cache is None:
                cache = _TLS.buffers = {}
            buf = cache.get(dtype)
            if buf is None or buf.numel() < numel:
                buf = cache[dtype] = torch.empty(numel, dtype=dtype, device=device)
        else:
            buf = torch.empty(numel, dtype=dtype, device=device)
        self.buf, self.offset = buf, 0

    def __call__(self, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        t = self.buf[self.offset:self.offset + n].view(shape)
        self.offset += -(-n // self.ALIGN) * self.ALIGN
        return t

    @classmethod
    def numel(cls, N: int, C: int, D: int) -> int:
        """Elements a group of N = chunks·BH chunk-heads takes in _forward_group (mirrors its allocations)."""
        c0 = min(C, NEUMANN_BLOCK)
        E = D + C
        shapes = [(N, C, D), (N, C + 1, D), (N, C + 1, D), (N, 3 * C, E), (N, 2, C, D), (N, 2, C, D),
                  (N, C, D), (N, 2 * C, 2 * C), (N, C // c0, c0, c0)]
        shapes += [(N * (C // c0), c0, c0)] * 4 + [(N, c0, E)] * 2
        shapes += [(N, 2 * C, D), (N, D, D), (N, C, D)]
        return sum(-(-math.prod(s) // cls.ALIGN) * cls.ALIGN for s in shapes)


def _neumann_inverse(L: torch.Tensor, arena: _Arena, eye: torch.Tensor) -> torch.Tensor:
    """(I - L)⁻¹ = (I + L)(I + L²)(I + L⁴)··· for strictly lower triangular L [M, c, c] (L^c = 0)."""
    M, c = L.shape[0], L.shape[-1]
    X, X_next = arena(M, c, c), arena(M, c, c)
    powers = arena(M, c, c), arena(M, c, c)
    torch.add(L, eye, out=X)
    P, s = L, 1
    while 2 * s < c:  # X = (I + L)···(I + L^s); P = L^s
        P = torch.bmm(P, P, out=powers[s.bit_length() % 2])
        X, X_next = torch.baddbmm(X, X, P, out=X_next), X
        s *= 2
    return X


def _forward_group(xs, S, y_out, C: int, arena: _Arena) -> None:
    """One group of whole chunks. xs: (r, w, k, v, a, b) as chunk-major views [n, B, H, C, D]; S: the start state
    in key-major layout Sᵀ [BH, K, V], overwritten with the end state; y_out: [n, B, H, C, D] view of y.

    With Λ_i = Σ_{τ≤i} μ_τ (chunk-local, Λ_{-1} = 0), every decay factor 2^{Λ_j - Λ_i} is taken as the product
    2^{Λ_j}·2^{-Λ_i} of two numbers in [2^-SPAN_MAX, 2^SPAN_MAX]: the four decay-weighted matrices are then plain
    matmuls of the scaled inputs (masked afterwards). The relative error is that of the exponents, as in the split.
    """
    r, w, k, v, a, b = xs
    n, B, H, _, D = r.shape
    BH = B * H
    N, E = n * BH, D + C
    c0 = min(C, NEUMANN_BLOCK)
    nb = C // c0
    dtype, device = S.dtype, S.device
    K = _constants(C, c0, dtype, device)

    def cm(t):  # [N, ...] -> [n, B, H, ...], the layout of the input views
        return t.view(n, B, H, *t.shape[1:])

    # μ = e^w / ln 2 (log2 units), Q = 2^[0, Λ_0, ..., Λ_{C-1}] and Qi = 1/Q
    mu = arena(N, C, D)
    if w.dtype == dtype:
        torch.add(K["log2_log2e"], w, alpha=LOG2E, out=cm(mu))
    else:  # convert first: the arithmetic stays in the compute dtype
        cm(mu).copy_(w)
        mu.mul_(LOG2E).add_(K["log2_log2e"])
    mu.exp2_()
    Q = arena(N, C + 1, D)
    Q[:, 0].zero_()
    torch.cumsum(mu, 1, out=Q[:, 1:])
    Q.exp2_()
    Qi = torch.reciprocal(Q, out=arena(N, C + 1, D))
    g = Qi[:, C]                                                          # e^{L_{C-1}} [N, D]

    # R = [ag | A_ak] and G2 = [[rg | A_rk], [W | TA]] (rows: tokens; columns: key channels, then tokens)
    RG, KB = arena(N, 3 * C, E), arena(N, 2, C, D)
    R, G2 = RG[:, :C], RG[:, C:]
    ag, rg = R[:, :, :D], G2[:, :C, :D]
    torch.mul(a, cm(Qi[:, :C]), out=cm(ag))                               # a_i e^{L_{i-1}}
    torch.mul(r, cm(Qi[:, 1:]), out=cm(rg))                               # r_i e^{L_i}
    torch.mul(k, cm(Q[:, 1:]), out=cm(KB[:, 0]))                          # k_j e^{-L_j}
    torch.mul(b, cm(Q[:, 1:]), out=cm(KB[:, 1]))
    KBt = torch.mul(KB, g[:, None, None], out=arena(N, 2, C, D))          # (kt, bt) = e^{L_{C-1} - L_j} (k, b)
    V = arena(N, C, D)
    cm(V).copy_(v)
    KB2 = KB.view(N, 2 * C, D)
    A = torch.bmm(RG[:, :2 * C, :D], KB2.mT, out=arena(N, 2 * C, 2 * C))  # [[A_ak, A_ab], [A_rk, A_rb]] unmasked
    Aa, Ar = A[:, :C], A[:, C:]
    torch.mul(Aa[:, :, :C], K["strict"], out=R[:, :, D:])
    torch.mul(Ar[:, :, :C], K["incl"], out=G2[:, :C, D:])
    A_rb = Ar[:, :, C:].mul_(K["incl"])
    A_ab = Aa[:, :, C:]  # only its strictly lower part is read below

    # [W | TA] = (I - A_ab)⁻¹ [ag | A_ak]: Neumann inverses of the diagonal blocks, then block forward substitution
    Lb = arena(N, nb, c0, c0)
    diag = A_ab.view(N, nb, c0, nb, c0).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    torch.mul(diag, K["strict_block"], out=Lb)
    Xb = _neumann_inverse(Lb.view(N * nb, c0, c0), arena, K["eye"]).view(N, nb, c0, c0)
    F = G2[:, C:]
    rhs, blk = arena(N, c0, E), arena(N, c0, E)
    for i in range(nb):
        rows = slice(i * c0, (i + 1) * c0)
        src = R[:, rows]
        if i:
            src = torch.baddbmm(src, A_ab[:, rows, :i * c0], F[:, :i * c0], out=rhs)
        F[:, rows].copy_(torch.bmm(Xb[:, i], src, out=blk))

    # chunk-parallel parts of the outputs and of the state update
    ADD = torch.bmm(G2[:, :, D:], V, out=arena(N, 2 * C, D))              # [A_rk V; TA V]
    KV = torch.bmm(KBt[:, 0].mT, V, out=arena(N, D, D))                   # ktᵀ V

    # the sequential part, per chunk: [Y'; SA] += [rg; W] Sᵀ,  Sᵀ <- g∘Sᵀ + ktᵀ V + btᵀ SA
    ADDs, SAs = ADD.view(n, BH, 2 * C, D).unbind(0), ADD.view(n, BH, 2 * C, D)[:, :, C:].unbind(0)
    LEFTs = G2.view(n, BH, 2 * C, E)[:, :, :, :D].unbind(0)
    KVs, gs = KV.view(n, BH, D, D).unbind(0), g.view(n, BH, D, 1).unbind(0)
    bts = KBt[:, 1].view(n, BH, C, D).mT.unbind(0)
    St = S
    for c in range(n):
        ADDs[c].baddbmm_(LEFTs[c], St)
        St = KVs[c].addcmul_(St, gs[c]).baddbmm_(bts[c], SAs[c])
    S.copy_(St)
    Y = torch.baddbmm(ADD[:, :C], A_rb, ADD[:, C:], out=arena(N, C, D))  # Y = rg Sᵀ + A_rk V + A_rb SA
    y_out.copy_(cm(Y))


def _chunk_major(x: torch.Tensor, start: int, n: int, C: int) -> torch.Tensor:
    """Tokens [start, start + n·C) of x [B, T, H, D] as a chunk-major view [n, B, H, C, D]."""
    B, T, H, D = x.shape
    if x.is_contiguous():  # one view op instead of three
        return x.as_strided((n, B, H, C, D), (C * H * D, T * H * D, D, H * D, 1), x.storage_offset() + start * H * D)
    return x[:, start:start + n * C].reshape(B, n, C, H, D).permute(1, 0, 3, 2, 4)


def wkv7_forward(r, w, k, v, a, b, s0=None, chunk: int = DEFAULT_CHUNK):
    """WKV-7 without an autograd graph (the path under torch.no_grad()): (y, sT) as in wkv7_reference, or None
    when a single step decays more than SPAN_MAX allows (w > ln(SPAN_MAX·ln 2) ≈ 3.3; the stable path runs).

    The sequence runs in groups of whole chunks that fit WORKSPACE_BYTES, then a last partial chunk (zero-padded
    to a power of two); the state passes from group to group.
    """
    B, T, H, D = r.shape
    C = forward_chunk(T, chunk, float(w.max()))
    if C == 0:
        return None
    cdt = compute_dtype(r, w, k, v, a, b, s0)
    device = r.device
    BH = B * H
    S = torch.empty(BH, D, D, dtype=cdt, device=device)                  # Sᵀ: key-major
    if s0 is None:
        S.zero_()
    else:
        S.copy_(s0.reshape(BH, D, D).mT)
    y = torch.empty(B, T, H, D, dtype=r.dtype, device=device)
    xs = (r, w, k, v, a, b)
    full = T // C
    per_chunk = _Arena.numel(BH, C, D)
    step = max(1, (WORKSPACE_BYTES * 8 // torch.finfo(cdt).bits) // per_chunk)
    with torch.autocast(device.type, enabled=False):
        for first in range(0, full, step):
            n = min(step, full - first)
            arena = _Arena(_Arena.numel(n * BH, C, D), cdt, device)
            start = first * C
            _forward_group([_chunk_major(x, start, n, C) for x in xs], S, _chunk_major(y, start, n, C), C, arena)
        tail = T - full * C
        if tail:
            Ct = effective_chunk(tail, C)
            pads = [torch.nn.functional.pad(x[:, full * C:], (0, 0, 0, 0, 0, Ct - tail),
                                            value=-math.inf if x is w else 0.0) for x in xs]
            y_tail = torch.empty(B, Ct, H, D, dtype=r.dtype, device=device)
            arena = _Arena(_Arena.numel(BH, Ct, D), cdt, device)
            _forward_group([_chunk_major(x, 0, 1, Ct) for x in pads], S, _chunk_major(y_tail, 0, 1, Ct), Ct, arena)
            y[:, full * C:] = y_tail[:, :tail]
    return y, S.view(B, H, D, D).mT.contiguous()


def wkv7_torch(r, w, k, v, a, b, s0=None, chunk: int = DEFAULT_CHUNK):
    """Chunked WKV-7 (CPU-friendly torch). Same contract as kernels.reference.wkv7_reference.

    On the CPU, without an autograd graph to build (torch.no_grad(), or no input requiring grad), the forward-only
    path runs; otherwise WKV7Chunked, whose forward saves what its backward needs. The forward-only path is tuned
    for the CPU (a sequential loop of small products) and is several times slower than WKV7Chunked's forward on a
    GPU, so CUDA tensors (whose default kernel is Triton anyway) skip it."""
    inputs = (r, w, k, v, a, b, s0)
    if r.device.type == "cpu" and not (torch.is_grad_enabled() and
                                       any(t is not None and t.requires_grad for t in inputs)):
        out = wkv7_forward(r, w, k, v, a, b, s0, chunk)
        if out is not None:
            return out
    B, T, H, D = r.shape
    if s0 is None:
        s0 = torch.zeros(B, H, D, D, dtype=compute_dtype(r, w, k, v, a, b), device=r.device)
    return WKV7Chunked.apply(r, w, k, v, a, b, s0, chunk)
