"""From-scratch initialisation of RWKV7, following RWKV-7's own scheme.

Source: BlinkDL/RWKV-LM, RWKV-v7/train_temp/src/model.py (the version at commit 118e451): the constructors of
RWKV_Tmix_x070 / RWKV_CMix_x070 set the non-matrix parameters, and RWKV.generate_init_weight then re-initialises
every `*.weight` matrix. What is followed here, with c = channel index, C = width, N = head size, l = layer,
L = layers, ratio_0_to_1 = l / (L − 1), ratio_1_to_almost0 = 1 − l / L, ddd_c = c / C, linear_c = c/(C−1) − 0.5,
zigzag_c = z·|z| with z = ((c mod N) − (N−1)/2) / ((N−1)/2):

- token-shift mixes: att x_r, x_g = 1 − ddd^(0.2 ρ); x_w, x_a = 1 − ddd^(0.9 ρ); x_k, x_v = 1 − ddd^(0.7 ρ) with
  ρ = ratio_1_to_almost0; ffn x_k = 1 − ddd^(ρ⁴).
- decay bias w0 = −6 + 6 (c/(C−1))^(1 + ratio_0_to_1^0.3) + 0.5 + 2.5 zigzag.
- a0 = −0.19 + 0.3 zigzag + 0.4 linear; v0 = 0.73 − 0.4 linear; k_k = 0.71 − 0.1 linear; k_a = 1.02; r_k = −0.04.
- LoRA: w1, a1, v1, g1 = 0; w2, a2, v2, g2 orthogonal with gain 0.1 (× sqrt(rows/cols) when rows > cols).
- ln_x weight = ((l + 1) / L)^0.7, bias 0; all LayerNorms weight 1, bias 0.
- matrices: receptance, value, ffn.key orthogonal gain 1; key orthogonal gain 0.1; output and ffn.value zero.
- emb uniform(±1e-4); head orthogonal with gain 0.5·sqrt(V/C) if V > C else 0.5.

`init_weights(model, seed)` is deterministic: every random tensor is drawn on the CPU from one generator seeded
with `seed`, in a fixed order, then copied into the (any-device) parameter.

`from_scratch(cfg, seed)` is the model a run starts from: built without the constructor's default initialisation
(init_weights sets every parameter anyway), and its initial weights kept per process, so that a warm worker's later
runs of the same shape and seed (a stage's baseline and candidates share a seed) copy them instead of drawing them
again. The QR decompositions of the orthogonal matrices dominate: tens of seconds on a small CPU for the 0.1B shape,
most of it the 65536 × 768 head.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from model.rwkv7 import RWKV7

EMB_SCALE = 1e-4
LORA_GAIN = 0.1
KEY_GAIN = 0.1


def _orthogonal(shape: tuple[int, ...], gain: float, gen: torch.Generator) -> Tensor:
    t = torch.empty(shape)
    nn.init.orthogonal_(t, gain=gain, generator=gen)
    return t


def _lora_out(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    rows, cols = shape
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    return _orthogonal(shape, gain * LORA_GAIN, gen)


@torch.no_grad()
def init_weights(model: RWKV7, seed: int) -> RWKV7:
    cfg = model.cfg
    C, N, L, V = cfg.n_embd, cfg.head_size, cfg.n_layer, cfg.vocab_size
    gen = torch.Generator().manual_seed(seed)
    c = torch.arange(C, dtype=torch.float64)
    ddd = c / C
    linear = c / max(C - 1, 1) - 0.5
    half = max((N - 1) / 2, 0.5)
    zz = ((c % N) - (N - 1) / 2) / half
    zigzag = zz * zz.abs()

    def put(param: Tensor, value: Tensor | float) -> None:
        if isinstance(value, Tensor):
            param.copy_(value.reshape(param.shape).to(param.dtype))
        else:
            param.fill_(value)

    emb = torch.empty(V, C)
    nn.init.uniform_(emb, -EMB_SCALE, EMB_SCALE, generator=gen)
    put(model.emb.weight, emb)

    for layer, block in enumerate(model.blocks):
        ratio_0_to_1 = layer / (L - 1) if L > 1 else 0.0
        rho = 1.0 - layer / L
        att, ffn = block.att, block.ffn
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            put(getattr(att, name), 1.0 - ddd.pow(power * rho))
        www = -6 + 6 * (c / max(C - 1, 1)).pow(1 + ratio_0_to_1**0.3)
        put(att.w0, www + 0.5 + zigzag * 2.5)
        put(att.a0, -0.19 + zigzag * 0.3 + linear * 0.4)
        if layer > 0:
            put(att.v0, 0.73 - linear * 0.4)
        put(att.k_k, 0.71 - linear * 0.1)
        put(att.k_a, 1.02)
        put(att.r_k, -0.04)
        lora = ["w", "a", "g"] + (["v"] if layer > 0 else [])
        for p in lora:
            put(getattr(att, f"{p}1"), 0.0)
            w2 = getattr(att, f"{p}2")
            put(w2, _lora_out(tuple(w2.shape), gen))
        put(att.receptance.weight, _orthogonal((C, C), 1.0, gen))
        put(att.key.weight, _orthogonal((C, C), KEY_GAIN, gen))
        put(att.value.weight, _orthogonal((C, C), 1.0, gen))
        put(att.output.weight, 0.0)
        put(att.ln_x.weight, ((layer + 1) / L) ** 0.7)
        put(att.ln_x.bias, 0.0)
        put(ffn.x_k, 1.0 - ddd.pow(rho**4))
        put(ffn.key.weight, _orthogonal(tuple(ffn.key.weight.shape), 1.0, gen))
        put(ffn.value.weight, 0.0)
        for ln in [block.ln1, block.ln2] + ([block.ln0] if layer == 0 else []):
            put(ln.weight, 1.0)
            put(ln.bias, 0.0)

    put(model.ln_out.weight, 1.0)
    put(model.ln_out.bias, 0.0)
    head_gain = 0.5 * math.sqrt(V / C) if V > C else 0.5
    put(model.head.weight, _orthogonal((V, C), head_gain, gen))
    return model


# initial weights of recent (shape, seed, CPU threads) keys, least recently used first; bounded in bytes
_INITIAL: OrderedDict[tuple[str, int, int], dict[str, Tensor]] = OrderedDict()
INITIAL_CACHE_BYTES = 4 << 30


@contextmanager
def _no_default_init():
    """Modules built inside skip torch's default random initialisation (init_weights overwrites it). Not the meta
    device: building there imports torch's reference decompositions, seconds of a fresh process's start-up."""
    names = ("kaiming_uniform_", "uniform_", "normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _nbytes(state: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@torch.no_grad()
def from_scratch(cfg, seed: int, kernel: str = "auto") -> RWKV7:
    """A new RWKV7 of `cfg` on the CPU holding exactly `init_weights(RWKV7(cfg), seed)`'s weights."""
    with _no_default_init():
        model = RWKV7(cfg, kernel=kernel)
    key = (cfg.model_dump_json(), int(seed), torch.get_num_threads())  # QR's rounding may depend on the threads
    state = _INITIAL.get(key)
    if state is None:
        init_weights(model, seed)
        state = {name: p.detach().clone() for name, p in model.named_parameters()}
        if _nbytes(state) <= INITIAL_CACHE_BYTES:
            _INITIAL[key] = state
            while sum(_nbytes(s) for s in _INITIAL.values()) > INITIAL_CACHE_BYTES:
                _INITIAL.popitem(last=False)
    else:
        _INITIAL.move_to_end(key)
        for name, p in model.named_parameters():
            p.copy_(state[name])
    return model
