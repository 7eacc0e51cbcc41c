"""The WKV-7 operator: every CPU backend against the float64 per-step reference, gradcheck, dispatch errors.

Error metric: err(x) = max |x - x_ref| / max |x_ref|, per tensor, against the reference run in float64.
Tolerances for float32 computation:  y, sT ≤ 1e-5;  every gradient (r, w, k, v, a, b, s0) ≤ 3e-5.
(Measured on these inputs: about 1e-7 to 3e-6; the wide-w cases are the worst.)
A float64 run of the torch path must agree to 1e-10.
"""
from __future__ import annotations

import functools
import math
import sys
import types

import pytest
import torch

import kernels
from kernels import dispatch
from kernels import torch_chunked
from kernels.fla_backend import (FLA_INSTALL_HINT, fla_convention_recurrence, state_from_fla, state_to_fla,
                                 w_to_fla)
from kernels.reference import W_MODEL_RANGE, rwkv7_like_inputs, wkv7_reference
from kernels.torch_chunked import wkv7_torch

TOL_FP32_OUT = 1e-5
TOL_FP32_GRAD = 3e-5
TOL_FP64 = 1e-10
W_WIDE_RANGE = (-3.0, 1.5)  # decays down to exp(-e^1.5) ≈ 0.011: far outside the model range
GRAD_NAMES = ("r", "w", "k", "v", "a", "b", "s0")

# (B, T, H, D, w range); T = 1, 7, 33, 100 cover one token, a short chunk, padding, several chunks
CASES = [
    (1, 1, 2, 16, W_MODEL_RANGE),
    (2, 7, 3, 16, W_MODEL_RANGE),
    (1, 33, 2, 32, W_MODEL_RANGE),
    (1, 100, 1, 64, W_MODEL_RANGE),
    (2, 33, 4, 16, W_WIDE_RANGE),
    (1, 100, 2, 32, W_WIDE_RANGE),
    (1, 20, 1, 24, W_MODEL_RANGE),  # a head size that is not a power of two
]


def err(x: torch.Tensor, ref: torch.Tensor | None) -> float:
    if ref is None:  # no gradient path in the reference: the gradient is zero
        return x.abs().max().item()
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def run_with_grads(op, inputs, dy, dsT):
    """(y, sT, grads of r, w, k, v, a, b, s0) for loss = Σ y·dy + Σ sT·dsT."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    y, sT = op(*leaves)
    loss = (y * dy.to(y.dtype)).sum() + (sT * dsT.to(sT.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return y.detach(), sT.detach(), grads


@functools.lru_cache(maxsize=None)
def oracle(case):
    """float64 reference outputs and gradients for a case, plus the inputs and the incoming gradients."""
    B, T, H, D, w_range = case
    inputs = rwkv7_like_inputs(B, T, H, D, dtype=torch.float64, w_range=w_range, seed=T * 131 + D)
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    dsT = torch.randn(B, H, D, D, generator=g, dtype=torch.float64)
    return inputs, dy, dsT, run_with_grads(wkv7_reference, inputs, dy, dsT)


def assert_close_to_oracle(case, op, dtype, tol_out, tol_grad):
    inputs, dy, dsT, (y_ref, s_ref, g_ref) = oracle(case)
    y, sT, grads = run_with_grads(op, [x.to(dtype) for x in inputs], dy, dsT)
    assert y.dtype == dtype and sT.dtype == dtype
    errors = {"y": err(y, y_ref), "sT": err(sT, s_ref)}
    errors.update({f"d{n}": err(g, gr) for n, g, gr in zip(GRAD_NAMES, grads, g_ref)})
    bad = {k: e for k, e in errors.items() if e > (tol_out if k in ("y", "sT") else tol_grad)}
    assert not bad, f"errors above tolerance: {bad} (all: {errors})"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}D{c[3]}w{c[4][1]}")
def test_torch_backend_fp32_matches_fp64_reference(case):
    assert_close_to_oracle(case, lambda *x: kernels.wkv7(*x, backend="torch"), torch.float32,
                           TOL_FP32_OUT, TOL_FP32_GRAD)


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}D{c[3]}")
def test_reference_fp32_matches_fp64_reference(case):
    assert_close_to_oracle(case, lambda *x: kernels.wkv7(*x, backend="reference"), torch.float32,
                           TOL_FP32_OUT, TOL_FP32_GRAD)


@pytest.mark.parametrize("chunk, case", [(1, CASES[1]), (4, CASES[5]), (16, CASES[5]), (64, CASES[5])])
def test_torch_backend_fp64_any_chunk_equals_reference(chunk, case):
    """Chunk 1 (no intra-chunk work), small chunks (many chunks, padding), 64 (Neumann blocks + doubling)."""
    assert_close_to_oracle(case, lambda *x: wkv7_torch(*x, chunk=chunk), torch.float64, TOL_FP64, TOL_FP64)


def test_torch_backend_doubling_inverse_path(monkeypatch):
    """Force the blockwise doubling of (I - A_ab)⁻¹ at small sizes (Neumann blocks of 2, chunk 16)."""
    monkeypatch.setattr(torch_chunked, "NEUMANN_BLOCK", 2)
    assert_close_to_oracle(CASES[2], lambda *x: wkv7_torch(*x, chunk=16), torch.float64, TOL_FP64, TOL_FP64)


@pytest.mark.parametrize("chunk, fast", [(2, False), (8, True)])
def test_torch_backend_gradcheck(chunk, fast, monkeypatch):
    """Full Jacobians on a tiny shape (chunk 2: several chunks, padding); random projections at chunk 8, where
    Neumann blocks of 2 force the doubling inverse."""
    monkeypatch.setattr(torch_chunked, "NEUMANN_BLOCK", 2)
    B, T, H, D = (1, 5, 1, 2) if not fast else (1, 11, 2, 3)
    inputs = rwkv7_like_inputs(B, T, H, D, dtype=torch.float64, seed=3)
    leaves = [x.requires_grad_(True) for x in inputs]
    assert torch.autograd.gradcheck(lambda *x: wkv7_torch(*x, chunk=chunk), leaves, eps=1e-6, atol=1e-7,
                                    rtol=1e-5, fast_mode=fast)


def test_state_gradient_only_and_output_gradient_only():
    inputs = rwkv7_like_inputs(1, 20, 2, 8, seed=1)
    for use in ("y", "sT"):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        y, sT = wkv7_torch(*leaves, chunk=8)
        ref_leaves = [x.detach().double().requires_grad_(True) for x in inputs]
        y_ref, s_ref = wkv7_reference(*ref_leaves)
        (y if use == "y" else sT).sum().backward()
        (y_ref if use == "y" else s_ref).sum().backward()
        for n, x, xr in zip(GRAD_NAMES, leaves, ref_leaves):
            assert err(x.grad, xr.grad) < TOL_FP32_GRAD, (use, n)


def test_no_initial_state_means_zeros():
    r, w, k, v, a, b, _ = rwkv7_like_inputs(2, 12, 2, 8, seed=2)
    zeros = torch.zeros(2, 2, 8, 8)
    for backend in ("reference", "torch"):
        y0, s0 = kernels.wkv7(r, w, k, v, a, b, None, backend=backend)
        y1, s1 = kernels.wkv7(r, w, k, v, a, b, zeros, backend=backend)
        torch.testing.assert_close(y0, y1)
        torch.testing.assert_close(s0, s1)


def test_torch_backend_ignores_autocast():
    """Under CPU bf16 autocast the chunked path still computes in float32 (forward and backward)."""
    inputs = rwkv7_like_inputs(1, 40, 2, 16, seed=8)
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, sT = wkv7_torch(*leaves)
        (y.sum() + sT.sum()).backward()
    y_ref, s_ref, g_ref = run_with_grads(wkv7_reference, [x.double() for x in inputs],
                                         torch.ones(1, 40, 2, 16, dtype=torch.float64),
                                         torch.ones(1, 2, 16, 16, dtype=torch.float64))
    assert y.dtype == torch.float32 and err(y, y_ref) < TOL_FP32_OUT and err(sT, s_ref) < TOL_FP32_OUT
    for n, x, gr in zip(GRAD_NAMES, leaves, g_ref):
        assert err(x.grad, gr) < TOL_FP32_GRAD, n


def test_split_sequence_equals_one_pass():
    """Running T in two calls, the second seeded with the first's sT, equals one call (the prompt/answer use)."""
    r, w, k, v, a, b, s0 = rwkv7_like_inputs(1, 50, 2, 16, seed=4)
    y, sT = kernels.wkv7(r, w, k, v, a, b, s0, backend="torch")
    cut = 21
    y1, s1 = kernels.wkv7(*(x[:, :cut] for x in (r, w, k, v, a, b)), s0, backend="torch")
    y2, s2 = kernels.wkv7(*(x[:, cut:] for x in (r, w, k, v, a, b)), s1, backend="torch")
    torch.testing.assert_close(torch.cat((y1, y2), dim=1), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, sT, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_dtypes(backend):
    inputs = rwkv7_like_inputs(1, 10, 2, 8, seed=5)
    y, sT = kernels.wkv7(*[x.to(torch.bfloat16) for x in inputs[:6]], inputs[6], backend=backend)
    assert y.dtype == torch.bfloat16 and sT.dtype == torch.float32
    y, sT = kernels.wkv7(*[x.double() for x in inputs], backend=backend)
    assert y.dtype == torch.float64 and sT.dtype == torch.float64
    y_ref, _ = wkv7_reference(*[x.double() for x in inputs])
    y16, _ = kernels.wkv7(*[x.to(torch.bfloat16) for x in inputs[:6]], inputs[6], backend=backend)
    assert err(y16, y_ref) < 5e-2  # bf16 inputs and output: only a sanity bound


# ---------------------------------------------------------------------------------------------------------------
# the forward-only path of the torch backend (no autograd graph: torch.no_grad(), inference)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}D{c[3]}w{c[4][1]}")
def test_forward_only_path_matches_fp64_reference(case):
    inputs, _, _, (y_ref, s_ref, _) = oracle(case)
    y, sT = torch_chunked.wkv7_forward(*[x.float() for x in inputs])
    assert y.dtype == sT.dtype == torch.float32
    assert err(y, y_ref) < TOL_FP32_OUT and err(sT, s_ref) < TOL_FP32_OUT, (err(y, y_ref), err(sT, s_ref))
    y, sT = torch_chunked.wkv7_forward(*inputs)
    assert y.dtype == sT.dtype == torch.float64
    assert err(y, y_ref) < TOL_FP64 and err(sT, s_ref) < TOL_FP64


@pytest.mark.parametrize("chunk, shape", [(1, (2, 7, 3, 16)), (2, (1, 30, 2, 8)), (8, (1, 33, 2, 32)),
                                          (64, (1, 100, 1, 64))])
def test_forward_only_path_any_chunk(chunk, shape):
    """Chunk 1 and 2 (trivial blocks), 8 with a padded tail, 64: four 16-token blocks of the forward substitution,
    then 36 tokens padded to 64."""
    inputs = rwkv7_like_inputs(*shape, dtype=torch.float64, w_range=(-4.0, -1.0), seed=chunk)
    assert torch_chunked.forward_chunk(shape[1], chunk, inputs[1].max().item()) == chunk
    y, sT = torch_chunked.wkv7_forward(*inputs, chunk=chunk)
    y_ref, s_ref = wkv7_reference(*inputs)
    assert err(y, y_ref) < TOL_FP64 and err(sT, s_ref) < TOL_FP64


def test_forward_chunk_shrinks_with_the_decay_rate():
    fc = torch_chunked.forward_chunk
    assert fc(512, 32, -0.5) == 32  # model range: μ_max = e^-0.5 / ln 2 = 0.875, a chunk spans at most 28
    assert fc(512, 64, -0.5) == 32 and fc(512, 16, -0.5) == 16
    assert fc(7, 32, -1.0) == 8 and fc(1, 32, -1.0) == 1 and fc(512, 32, float("-inf")) == 32
    assert fc(512, 32, 1.5) == 4  # μ = 6.47
    assert fc(512, 32, 4.0) == 0 and fc(512, 32, float("nan")) == 0 and fc(512, 32, 1e6) == 0


def test_forward_only_path_hands_extreme_decay_to_the_stable_path():
    r, w, k, v, a, b, s0 = rwkv7_like_inputs(1, 40, 2, 16, dtype=torch.float64, w_range=(-3.0, 5.0), seed=11)
    assert torch_chunked.wkv7_forward(r, w, k, v, a, b, s0) is None
    with torch.no_grad():
        y, sT = kernels.wkv7(r, w, k, v, a, b, s0, backend="torch")
    y_ref, s_ref = wkv7_reference(r, w, k, v, a, b, s0)
    assert err(y, y_ref) < TOL_FP64 and err(sT, s_ref) < TOL_FP64


def test_no_grad_takes_the_forward_only_path(monkeypatch):
    calls = []
    real = torch_chunked.wkv7_forward
    monkeypatch.setattr(torch_chunked, "wkv7_forward", lambda *x, **kw: calls.append(1) or real(*x, **kw))
    inputs = [x.requires_grad_(True) for x in rwkv7_like_inputs(1, 12, 2, 8, seed=3)]
    with torch.no_grad():
        y, _ = kernels.wkv7(*inputs, backend="torch")
    assert len(calls) == 1 and not y.requires_grad
    with torch.inference_mode():
        kernels.wkv7(*inputs, backend="torch")
    assert len(calls) == 2
    y, _ = kernels.wkv7(*inputs, backend="torch")  # gradients wanted: the autograd path
    assert len(calls) == 2 and y.requires_grad
    kernels.wkv7(*[x.detach() for x in inputs], backend="torch")  # nothing requires grad
    assert len(calls) == 3


def test_forward_only_groups_pass_the_state(monkeypatch):
    """A workspace of two chunks splits the sequence into groups (and a padded tail); the state goes through."""
    inputs = rwkv7_like_inputs(2, 150, 3, 16, dtype=torch.float64, seed=12)
    y1, s1 = torch_chunked.wkv7_forward(*inputs, chunk=16)
    groups = []
    real = torch_chunked._forward_group
    monkeypatch.setattr(torch_chunked, "_forward_group", lambda *x: groups.append(x[0][0].shape[0]) or real(*x))
    monkeypatch.setattr(torch_chunked, "WORKSPACE_BYTES", 2 * torch_chunked._Arena.numel(6, 16, 16) * 8)
    y2, s2 = torch_chunked.wkv7_forward(*inputs, chunk=16)
    assert groups == [2, 2, 2, 2, 1, 1]  # 9 whole chunks of 16, then 6 tokens padded to 8
    torch.testing.assert_close(y2, y1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, s1, rtol=1e-12, atol=1e-12)
    y_ref, s_ref = wkv7_reference(*inputs)
    assert err(y2, y_ref) < TOL_FP64 and err(s2, s_ref) < TOL_FP64


@pytest.mark.parametrize("T, chunk", [(1, 32), (6, 32), (100, 32), (100, 64), (40, 2)])
def test_forward_only_scratch_size_is_exact(T, chunk, monkeypatch):
    """_Arena.numel mirrors the allocations of _forward_group: every group uses exactly what was reserved."""
    used = []
    real = torch_chunked._forward_group

    def spy(xs, S, y_out, C, arena):
        real(xs, S, y_out, C, arena)
        used.append((arena.offset, torch_chunked._Arena.numel(xs[0].shape[0] * xs[0].shape[1] * xs[0].shape[2], C,
                                                              xs[0].shape[-1])))

    monkeypatch.setattr(torch_chunked, "_forward_group", spy)
    torch_chunked.wkv7_forward(*rwkv7_like_inputs(2, T, 3, 24, seed=16), chunk=chunk)
    assert used and all(offset == reserved for offset, reserved in used)


def test_forward_only_path_takes_non_contiguous_inputs():
    inputs = rwkv7_like_inputs(2, 70, 3, 8, dtype=torch.float64, seed=15)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs[:6]] + [inputs[6]]
    assert not strided[0].is_contiguous()
    y, sT = torch_chunked.wkv7_forward(*strided, chunk=16)
    y_ref, s_ref = wkv7_reference(*inputs)
    assert err(y, y_ref) < TOL_FP64 and err(sT, s_ref) < TOL_FP64


@pytest.mark.parametrize("shape", [(1, 64, 2, 16), (1, 16, 1, 8)])
def test_forward_only_outputs_outlive_the_workspace(shape):
    """The scratch buffer is reused by the next call: the outputs of a call must not live in it."""
    first = torch_chunked.wkv7_forward(*rwkv7_like_inputs(*shape, seed=13))
    kept = [t.clone() for t in first]
    torch_chunked.wkv7_forward(*rwkv7_like_inputs(*shape, seed=14))
    assert all(torch.equal(t, c) for t, c in zip(first, kept))


def test_forward_only_path_ignores_autocast():
    inputs = rwkv7_like_inputs(1, 40, 2, 16, seed=8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, sT = wkv7_torch(*inputs)
    y_ref, s_ref = wkv7_reference(*[x.double() for x in inputs])
    assert y.dtype == sT.dtype == torch.float32
    assert err(y, y_ref) < TOL_FP32_OUT and err(sT, s_ref) < TOL_FP32_OUT


def test_model_under_no_grad_takes_the_forward_only_path(monkeypatch):
    """RWKV7 with the default kernel (auto: the torch path on CPU) under torch.no_grad(), left padding included,
    goes through the forward-only path in every layer and matches the per-step reference kernel."""
    from model.config import ModelConfig
    from model.init import init_weights
    from model.rwkv7 import RWKV7

    cfg = ModelConfig(vocab_size=257, n_layer=2, n_embd=64, head_size=16, tokenizer="byte",
                      d_decay=16, d_aaa=16, d_mv=8, d_gate=24)
    idx = torch.randint(0, 257, (2, 37), generator=torch.Generator().manual_seed(1))
    pad = torch.tensor([0, 6])
    calls = []
    real = torch_chunked.wkv7_forward
    monkeypatch.setattr(torch_chunked, "wkv7_forward", lambda *x, **kw: calls.append(1) or real(*x, **kw))
    logits = {}
    for kernel in ("reference", "auto"):
        model = init_weights(RWKV7(cfg, kernel=kernel), seed=0)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(5)
            for p in model.parameters():  # the init zeroes some tensors: noise makes every path count
                p.add_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() < 2 else 0.5 / p.shape[-1] ** 0.5))
            logits[kernel], _ = model(idx, pad_left=pad)
    assert len(calls) == cfg.n_layer
    assert (logits["auto"] - logits["reference"]).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# fla conventions (fla itself is not installed here): our conversions + fla's recurrence == our reference
# ---------------------------------------------------------------------------------------------------------------

def test_fla_conversions_match_reference():
    r, w, k, v, a, b, s0 = rwkv7_like_inputs(2, 17, 3, 8, dtype=torch.float64, w_range=W_WIDE_RANGE, seed=6)
    y_ref, s_ref = wkv7_reference(r, w, k, v, a, b, s0)
    o, h = fla_convention_recurrence(r, w_to_fla(w), k, v, a, b, state_to_fla(s0))
    torch.testing.assert_close(o, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state_from_fla(h), s_ref, rtol=1e-12, atol=1e-12)
    assert state_to_fla(s0).shape == s0.shape and torch.equal(state_from_fla(state_to_fla(s0)), s0)
    assert torch.equal(state_to_fla(s0)[0, 0], s0[0, 0].T)


@pytest.mark.parametrize("model_range", [False, True])
def test_fla_backend_runs_fla_as_its_rwkv7_layer_does_in_the_model_range(model_range, monkeypatch):
    """With fla's chunk_rwkv7 replaced by its recurrence: the conversions hold end to end, and the model's promise
    w < -0.5 selects fla's layer configuration (chunks of 64, tensor-core gates, the log-decay bound), which the
    converted decays respect; without the promise fla gets no options (its general path)."""
    from kernels import fla_backend

    seen = {}

    def fake_chunk_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state, **options):
        seen.update(options, scale=scale, w_min=w.min().item(), w_max=w.max().item())
        return fla_convention_recurrence(r, w, k, v, a, b, initial_state.to(r.dtype))  # fla takes an fp32 state

    monkeypatch.setattr(fla_backend, "load_chunk_rwkv7", lambda: fake_chunk_rwkv7)
    r, w, k, v, a, b, s0 = rwkv7_like_inputs(2, 9, 2, 8, seed=3, dtype=torch.float64)
    y, sT = fla_backend.wkv7_fla(r, w, k, v, a, b, s0, w_in_model_range=model_range)
    y_ref, s_ref = wkv7_reference(r, w, k, v, a, b, s0)
    # float64 inputs, but the initial state passes through float32 on its way to fla
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sT, s_ref, rtol=1e-6, atol=1e-6)
    assert seen["scale"] == 1.0
    if model_range:
        assert {k: seen[k] for k in ("safe_gate", "chunk_size", "lower_bound")} == {
            "safe_gate": True, "chunk_size": 64, "lower_bound": -math.exp(-0.5)}
        assert fla_backend.FLA_LOWER_BOUND <= seen["w_min"] and seen["w_max"] < 0
    else:
        assert set(seen) == {"scale", "w_min", "w_max"}


def test_fla_backend_missing_names_the_install_command():
    if dispatch._module_exists("fla"):
        pytest.skip("fla is installed here")
    inputs = rwkv7_like_inputs(1, 4, 1, 8, seed=0)
    with pytest.raises(ImportError, match=r"pip install fsearch\[fla\]"):
        kernels.wkv7(*inputs, backend="fla")
    assert "fsearch[fla]" in FLA_INSTALL_HINT


# ---------------------------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def small():
    return rwkv7_like_inputs(1, 6, 2, 8, seed=0)


def test_available_backends_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    names = kernels.available_backends()
    assert names[:2] == ["reference", "torch"]
    if not torch.cuda.is_available():
        assert "triton" not in names and "fla" not in names


def test_auto_is_torch_on_cpu(small, monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args)
        return wkv7_torch(*args)

    monkeypatch.setattr(dispatch, "wkv7_torch", spy)
    y, sT = kernels.wkv7(*small)
    assert len(calls) == 1
    y_ref, s_ref = wkv7_reference(*small)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)


def test_unknown_backend(small):
    with pytest.raises(ValueError, match=r"unknown WKV-7 backend 'cuda'; valid: auto, reference, torch, triton, fla"):
        kernels.wkv7(*small, backend="cuda")


def test_triton_on_cpu_tensors_is_an_error(small, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors"):
        kernels.wkv7(*small, backend="triton")


def test_triton_interpret_routes_cpu_tensors_to_the_triton_backend(small, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fake = types.ModuleType("kernels.triton_wkv7")
    fake.wkv7_triton = lambda *args, **kwargs: ("triton", args, kwargs)
    monkeypatch.setitem(sys.modules, "kernels.triton_wkv7", fake)
    out = kernels.wkv7(*small, backend="triton")
    assert out[0] == "triton" and len(out[1]) == 7 and out[2] == {"check_domain": True}
    out = kernels.wkv7(*small, backend="triton", w_in_model_range=True)
    assert out[2] == {"check_domain": False}


@pytest.mark.parametrize("mutate, message", [
    (lambda x: x.__setitem__(6, torch.zeros(1, 2, 8, 4)),
     r"s0 must be \[B, H, D, D\] = \(1, 2, 8, 8\), got shape \(1, 2, 8, 4\)"),
    (lambda x: x.__setitem__(1, x[1][:, :3]), r"w has shape \(1, 3, 2, 8\) but r has \(1, 6, 2, 8\)"),
    (lambda x: x.__setitem__(3, x[3][0]), r"v must be \[B, T, H, D\], got shape \(6, 2, 8\)"),
    (lambda x: x.__setitem__(0, x[0].long()), r"r must be a floating-point tensor"),
    (lambda x: x.__setitem__(2, x[2].numpy()), r"k must be a torch.Tensor, got ndarray"),
    (lambda x: [x.__setitem__(i, t[:, :0]) for i, t in enumerate(x[:6])], r"T >= 1"),
])
def test_dispatch_validation(small, mutate, message):
    mutate(small)
    with pytest.raises(ValueError, match=message):
        kernels.wkv7(*small, backend="torch")


def test_chunk_size_must_be_power_of_two(small):
    with pytest.raises(ValueError, match="chunk size must be a power of two, got 12"):
        wkv7_torch(*small, chunk=12)


def test_bench_cpu_prints_json_lines(capsys):
    import json

    from kernels.bench_cpu import main

    assert main(["--seq", "8", "--heads", "1", "--head-size", "8", "--repeats", "1", "--warmup", "0"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    timed = [d for d in lines if "backend" in d]
    assert {(d["backend"], d["pass"]) for d in timed} == {(b, p) for b in ("reference", "torch")
                                                          for p in ("forward", "forward_backward")}
    assert all(d["tokens_per_s"] > 0 and d["T"] == 8 for d in timed)
    assert {d["pass"] for d in lines if "speedup_torch_over_reference" in d} == {"forward", "forward_backward"}


@pytest.mark.parametrize("iclr", [1.0, 0.9])
def test_torch_path_repeated_tokens_full_accuracy(iclr):
    """Nearly repeated keys (head 0 aligned, head 1 alternating in sign), decay ~1: a Neumann-product inverse over
    16-token blocks lost accuracy here (kernels.bench.make_repeated_inputs)."""
    from kernels.bench import make_repeated_inputs

    xs, s0 = make_repeated_inputs(1, 256, 2, 32, torch.float32, "cpu", seed=16, iclr=iclr)
    y_ref, s_ref = wkv7_reference(*[x.double() for x in xs], s0.double())

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    with torch.no_grad():
        y, sT = wkv7_torch(*xs, s0)                     # the forward-only path
    leaves = [x.clone().requires_grad_() for x in xs]
    y2, sT2 = wkv7_torch(*leaves, s0)                    # the autograd path
    errs = [rel(y, y_ref), rel(sT, s_ref), rel(y2.detach(), y_ref), rel(sT2.detach(), s_ref)]
    assert max(errs) <= 1e-6, errs
