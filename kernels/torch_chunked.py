"""Chunked WKV-7 in plain torch: the CPU path, one autograd.Function with an explicit backward.

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
"""
from __future__ import annotations

import math

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


NEUMANN_BLOCK = 16  # diagonal blocks up to this size are inverted by the Neumann product, larger ones by doubling


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


def wkv7_torch(r, w, k, v, a, b, s0=None, chunk: int = DEFAULT_CHUNK):
    """Chunked WKV-7 (CPU-friendly torch). Same contract as kernels.reference.wkv7_reference."""
    B, T, H, D = r.shape
    if s0 is None:
        s0 = torch.zeros(B, H, D, D, dtype=compute_dtype(r, w, k, v, a, b), device=r.device)
    return WKV7Chunked.apply(r, w, k, v, a, b, s0, chunk)
