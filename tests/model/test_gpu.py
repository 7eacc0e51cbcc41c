"""RWKV7 on a CUDA device: bf16 autocast with fp32 master weights and fp32 states, against the fp32 oracle."""
from __future__ import annotations

import pytest
import torch

from model.fs_config import FSConfig
from model.rwkv7 import LayerState

pytestmark = pytest.mark.gpu

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@requires_cuda
@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_bf16_autocast_forward_backward_matches_fp32(kernel, make_config, make_model, make_tokens):
    cfg = make_config(n_layer=4, n_embd=128, head_size=64, d_decay=32, d_aaa=32, d_mv=32, d_gate=32)
    model = make_model(cfg, seed=1, kernel=kernel).cuda()
    oracle = make_model(cfg, seed=1, kernel="reference").cuda()
    fs = FSConfig(alpha_init=-1.0, alpha_lr=1e-3, layer_start=2, norm=True, clip=1.0)
    idx = make_tokens(3, 64, cfg.vocab_size).cuda()
    pad = torch.tensor([0, 5, 17], device="cuda")

    gates = model.make_fs_gates(fs)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, state = model(idx, fs=fs, fs_gates=gates, pad_left=pad)
    logits.logsumexp(-1).mean().backward()
    oracle_gates = oracle.make_fs_gates(fs)
    ref, ref_state = oracle(idx, fs=fs, fs_gates=oracle_gates, pad_left=pad)
    ref.logsumexp(-1).mean().backward()

    assert logits.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    assert all(isinstance(s, LayerState) and s.wkv.dtype == torch.float32 for s in state)
    for b, p in enumerate(pad.tolist()):
        assert _rel(logits[b, p:], ref[b, p:]) < 0.05
    assert max(_rel(s.wkv, r.wkv) for s, r in zip(state, ref_state)) < 0.05
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        if q.grad.norm() > 0:
            assert _rel(p.grad, q.grad) < 0.1, name
    assert _rel(gates.alpha.grad, oracle_gates.alpha.grad) < 0.1
