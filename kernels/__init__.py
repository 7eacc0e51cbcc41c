"""fsearch: kernels."""
