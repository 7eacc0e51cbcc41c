"""One entry point for the WKV-7 operator: `wkv7(r, w, k, v, a, b, s0=None, *, backend="auto") -> (y, sT)`.

Backends:
    reference  per-step loop (kernels/reference.py), the oracle; any device
    torch      chunked plain-torch path with an explicit backward (kernels/torch_chunked.py); any device, meant for CPU
    triton     GPU kernels (kernels/triton_wkv7.py); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
    fla        flash-linear-attention's chunk_rwkv7 (kernels/fla_backend.py); optional, CUDA
    auto       "triton" for CUDA tensors, "torch" otherwise

Shapes and devices are checked here, once, with one-line errors naming the tensor. There are no silent
fallbacks: a backend that cannot run on the given tensors raises.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from kernels.reference import wkv7_reference
from kernels.torch_chunked import wkv7_torch

BACKENDS = ("reference", "torch", "triton", "fla")
BACKEND_CHOICES = ("auto",) + BACKENDS
INPUT_NAMES = ("r", "w", "k", "v", "a", "b")


def triton_interpret() -> bool:
    """True when TRITON_INTERPRET=1, i.e. Triton kernels may run (slowly) on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> list[str]:
    """The backends that can run on this machine now (auto's choices included)."""
    names = ["reference", "torch"]
    gpu_or_interpreter = torch.cuda.is_available() or triton_interpret()
    if gpu_or_interpreter and _module_exists("triton") and _module_exists("kernels.triton_wkv7"):
        names.append("triton")
    if torch.cuda.is_available() and _module_exists("fla"):
        names.append("fla")
    return names


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for `backend` on tensors of `device` ("auto": triton on CUDA, torch elsewhere)."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown WKV-7 backend {backend!r}; valid: {', '.join(BACKEND_CHOICES)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def validate_inputs(r, w, k, v, a, b, s0) -> None:
    """Check the operator's contract: six [B, T, H, D] floating tensors on one device, T ≥ 1, s0 [B, H, D, D]."""
    tensors = dict(zip(INPUT_NAMES, (r, w, k, v, a, b)))
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    for name, x in tensors.items():
        if x.shape != r.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but r has {tuple(r.shape)}; "
                             f"r, w, k, v, a, b must all be [B, T, H, D]")
        if x.device != r.device:
            raise ValueError(f"{name} is on {x.device} but r is on {r.device}")
    B, T, H, D = r.shape
    if T < 1:
        raise ValueError(f"r must have T >= 1 tokens, got shape {tuple(r.shape)}")
    if s0 is not None:
        if not isinstance(s0, torch.Tensor):
            raise ValueError(f"s0 must be a torch.Tensor or None, got {type(s0).__name__}")
        if tuple(s0.shape) != (B, H, D, D):
            raise ValueError(f"s0 must be [B, H, D, D] = {(B, H, D, D)}, got shape {tuple(s0.shape)}")
        if not s0.is_floating_point():
            raise ValueError(f"s0 must be a floating-point tensor, got dtype {s0.dtype}")
        if s0.device != r.device:
            raise ValueError(f"s0 is on {s0.device} but r is on {r.device}")


def wkv7(r, w, k, v, a, b, s0=None, *, backend: str = "auto", w_in_model_range: bool = False):
    """WKV-7 over a sequence: (y [B, T, H, D] in r's dtype, sT [B, H, D, D]).

    Per head, S in [value, key] layout: S_t = S_{t-1}·diag(exp(-exp(w_t))) + (S_{t-1} a_t) b_tᵀ + v_t k_tᵀ,
    y_t = S_t r_t. s0 None means a zero initial state. Differentiable in every input including s0.
    `w_in_model_range=True` is the RWKV-7 model's promise that w < -0.5 (w = -softplus(·) - 0.5): the triton
    backend then skips its domain check (w <= ln 2), a reduction and a host sync per call, and fla runs in its own
    RWKV-7 layer's configuration (chunks of 64, tensor-core gate scheme; kernels.fla_backend).
    """
    validate_inputs(r, w, k, v, a, b, s0)
    name = resolve_backend(backend, r.device)
    if name == "reference":
        return wkv7_reference(r, w, k, v, a, b, s0)
    if name == "torch":
        return wkv7_torch(r, w, k, v, a, b, s0)
    if name == "triton":
        if r.device.type != "cuda" and not triton_interpret():
            raise ValueError(f"backend 'triton' needs CUDA tensors, got tensors on {r.device} "
                             f"(set TRITON_INTERPRET=1 to run the Triton interpreter on CPU)")
        from kernels.triton_wkv7 import wkv7_triton
        return wkv7_triton(r, w, k, v, a, b, s0, check_domain=not w_in_model_range)
    from kernels.fla_backend import load_chunk_rwkv7, wkv7_fla
    load_chunk_rwkv7()  # a clear ImportError when fla is missing
    if r.device.type != "cuda":
        raise ValueError(f"backend 'fla' needs CUDA tensors, got tensors on {r.device}")
    return wkv7_fla(r, w, k, v, a, b, s0, w_in_model_range=w_in_model_range)
