"""The Triton WKV-7 kernels on a CUDA GPU, against the float64 reference (run on the GPU machine).

Tolerances on ‖x − ref‖ / ‖ref‖ for y, sT and the gradients of r, w, k, v, a, b, s0
(kernels.bench.TOLERANCE): 5e-3 for bf16 inputs (TF32 products, bf16 outputs), 1e-5 for fp32 inputs
(full-fp32 products). The float64 per-step reference and the fp32 compiles dominate the run time (several
minutes; `python -m kernels.bench --check` runs the same comparisons and prints JSON lines).
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from kernels.bench import TOLERANCE, check_against_reference, make_inputs, tolerance  # noqa: E402
from kernels import triton_wkv7  # noqa: E402
from kernels.triton_wkv7 import wkv7_triton  # noqa: E402

CUDA = torch.device("cuda")
SHAPES = [
    (2, 100, 3, 64),     # ragged, D = 64
    (1, 8192, 2, 64),    # long T
    (1, 300, 2, 128),    # D = 128
    (2, 77, 2, 32),      # D = 32
    (1, 1, 1, 64),       # T = 1
    (3, 4096, 4, 64),    # several heads and batches, exact multiple of the chunk
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, dtype):
    errors = check_against_reference(shape, dtype, CUDA)
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_every_chunk_size_matches(chunk_size):
    errors = check_against_reference((2, 333, 2, 64), torch.float32, CUDA, chunk_size=chunk_size)
    assert max(errors.values()) <= TOLERANCE[torch.float32], errors


def test_without_s0():
    errors = check_against_reference((2, 500, 2, 64), torch.bfloat16, CUDA, with_s0=False)
    assert max(errors.values()) <= TOLERANCE[torch.bfloat16], errors


def test_deterministic_and_fully_written():
    xs, s0 = make_inputs(2, 1000, 3, 64, torch.bfloat16, CUDA, seed=7)
    outs = []
    for _ in range(2):
        leaves = [x.detach().clone().requires_grad_() for x in xs] + [s0.clone().requires_grad_()]
        y, sT = wkv7_triton(*leaves)
        grads = torch.autograd.grad([y, sT], leaves, [torch.ones_like(y), torch.ones_like(sT)])
        outs.append([y, sT, *grads])
    for first, second in zip(*outs):
        assert torch.isfinite(first).all()
        assert torch.equal(first, second)


def _saved_bytes(xs, s0):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    y, sT = wkv7_triton(*leaves, s0, check_domain=False)
    inputs = {x.data_ptr() for x in leaves}
    saved = [t for t in y.grad_fn.saved_tensors if t is not None and t.data_ptr() not in inputs]
    return sum(t.numel() * t.element_size() for t in saved)


def test_saved_bytes_are_the_documented_budget(monkeypatch):
    """D=64, C=32: fp32 H_c of every second chunk (256 B per token and head) plus, with reuse_factors, fp16
    M and Q (384 B): 640 B, less than the six bf16 inputs (768 B); without reuse_factors, less still."""
    B, T, H, D = 2, 4096, 4, 64
    xs, s0 = make_inputs(B, T, H, D, torch.bfloat16, CUDA)
    input_bytes = sum(x.numel() * x.element_size() for x in xs)
    per_token_head = _saved_bytes(xs, s0) / (B * T * H)
    assert per_token_head == 4 * D * D / (32 * 2) + 2 * D * D / 32 + 2 * D
    assert _saved_bytes(xs, s0) <= input_bytes
    monkeypatch.setitem(triton_wkv7.TUNING, D, {"reuse_factors": False})
    assert _saved_bytes(xs, s0) <= input_bytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(1, 1024, 2, 64), (1, 256, 2, 32)], ids=lambda s: "x".join(map(str, s)))
def test_repeated_tokens_match_float64_reference(shape, dtype):
    """Nearly repeated keys, in-context rate 1, decay ~1 (kernels.bench.make_repeated_inputs). bf16 mode has its own
    bound here (kernels.bench.REPEATED_TOLERANCE: the kept state accumulates TF32 rounding); fp32 mode the usual one."""
    errors = check_against_reference(shape, dtype, CUDA, inputs="repeated")
    assert max(errors.values()) <= tolerance(dtype, "repeated"), errors


def test_time_segments_give_bitwise_equal_results(monkeypatch):
    """The scans of one time piece overlap the chunk kernels of the next on a second stream."""
    xs, s0 = make_inputs(2, 2048, 3, 64, torch.bfloat16, CUDA, seed=3)
    outs = []
    for pieces in (1, 5):
        monkeypatch.setitem(triton_wkv7.TUNING, 64, {"segments_fwd": pieces, "segments_bwd": pieces})
        leaves = [x.detach().clone().requires_grad_() for x in xs] + [s0.clone().requires_grad_()]
        y, sT = wkv7_triton(*leaves, check_domain=False)
        grads = torch.autograd.grad([y, sT], leaves, [torch.ones_like(y), torch.ones_like(sT)])
        outs.append([y, sT, *grads])
    for first, second in zip(*outs):
        assert torch.equal(first, second)
