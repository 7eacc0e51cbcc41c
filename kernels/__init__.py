"""fsearch kernels: the WKV-7 operator behind one dispatch (imports torch; not part of the control plane).

    from kernels import wkv7
    y, sT = wkv7(r, w, k, v, a, b, s0, backend="auto")   # "reference" | "torch" | "triton" | "fla" | "auto"
"""
from kernels.dispatch import BACKEND_CHOICES, BACKENDS, available_backends, wkv7
from kernels.reference import wkv7_reference
from kernels.torch_chunked import wkv7_torch

__all__ = ["wkv7", "available_backends", "BACKENDS", "BACKEND_CHOICES", "wkv7_reference", "wkv7_torch"]
