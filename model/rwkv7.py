"""RWKV-7 "Goose" (the G1 architecture), readable top to bottom, with Future-Seed.

The math is the official RWKV-7 (BlinkDL's `rwkv` package, RWKV_x070, and RWKV-LM RWKV-v7 train_temp), and the
parameter names and shapes are BlinkDL's state-dict keys, so a BlinkDL .pth loads with a plain load_state_dict
(model/checkpoint.py). One block, for the LayerNorm'd input x [B, T, C]:

    token shift   δ = shift(x) − x, shift(x)_t = x_{t−1} (x_{−1} = the carried shift state); x_z = x + δ ⊙ x_z
    projections   r = x_r W_r, k = x_k W_k, v = x_v W_v
    decay         w = −softplus(−(w0 + tanh(x_w w1) w2)) − 0.5           (decay factor exp(−exp(w)) ∈ (e^−e^−0.5, 1))
    value resid.  layer 0: v_first = v; else v ← v + (v_first − v) ⊙ σ(v0 + (x_v v1) v2)
    ICL rate      a = σ(a0 + (x_a a1) a2)
    output gate   g = σ(x_g g1) g2
    keys          kk = L2-normalise per head (k ⊙ k_k);  k ← k ⊙ (1 + (a − 1) ⊙ k_a)
    WKV           y, S_T = wkv7(r, w, k, v, a = −kk, b = kk ⊙ a, s0)
    out           y = GroupNorm_H(y) + (Σ_head r ⊙ k ⊙ r_k) v ;  att = (y ⊙ g) W_o
    FFN           relu((x + δ ⊙ x_k) W_key)² W_value

Blocks: x ← LN0(x) (block 0 only); x ← x + att(LN1(x)); x ← x + ffn(LN2(x)). Model: emb → blocks → LN_out → head.

Recurrent state per block (`LayerState`): the last LN1 output (attention token shift), the WKV state [B, H, D, D]
float32 in RWKV's [value, key] layout, and the last LN2 output (FFN token shift) — exactly the three tensors per
layer of the official package's state.

Precision: parameters are float32 (master weights); under torch.autocast(bf16) the linears run in bf16,
LayerNorm/GroupNorm and the decay run in float32, the WKV operator gets r, w, k, v, a, b in one dtype (bf16 under
autocast, as in the official training kernel) and a float32 initial state, states stay float32, logits are float32.

Left padding (`pad_left`): at a pad position the WKV step is the identity (k = v = a = b = 0, decay 1) and no
token shift reads a pad (the first real token reads the carried shift state), so a padded row gives the unpadded
row's outputs at its real positions and the same final states.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.dispatch import wkv7
from kernels.reference import wkv7_reference
from model.config import ModelConfig
from model.fs_config import FSConfig
from model.future_seed import FSGates, future_seed

# GroupNorm eps of ln_x: the official value is 1e-5 * head_size_divisor**2 with head_size_divisor = 8, i.e. 64e-5
# for every head size (rwkv package RWKV_x070 and RWKV-LM train_temp both hard-code 64e-5).
GROUP_NORM_EPS = 64e-5
# Decay logit at padded positions: exp(-exp(-30)) == 1.0 in float32, so the WKV step is the identity there.
PAD_DECAY_LOGIT = -30.0


@dataclass
class LayerState:
    """Recurrent state of one block: att_shift [B, C], wkv [B, H, D, D] float32 ([value, key]), ffn_shift [B, C]."""

    att_shift: Tensor
    wkv: Tensor
    ffn_shift: Tensor

    def detach(self) -> "LayerState":
        return LayerState(self.att_shift.detach(), self.wkv.detach(), self.ffn_shift.detach())


def wkv_operator(kernel: str):
    """The WKV-7 operator `(r, w, k, v, a, b, s0) -> (y, sT)` for a kernel name ("reference" = the per-step oracle,
    anything else goes to kernels.dispatch.wkv7 as its backend, e.g. "auto", "torch", "triton", "fla")."""
    if kernel == "reference":
        return wkv7_reference
    return functools.partial(wkv7, backend=kernel, w_in_model_range=True)  # w = -softplus(.) - 0.5 < -0.5


@dataclass
class Padding:
    """Left padding of a batch: which positions are pads, and where the token shift must read the carried state."""

    is_pad: Tensor  # [B, T] bool
    shift_from_state: Tensor  # [B, T] bool: position t's shift input x_{t-1} is a pad (or t = 0)
    all_pad: Tensor  # [B] bool: the whole row is padding

    @classmethod
    def build(cls, pad_left: Tensor, T: int) -> "Padding":
        if pad_left.dim() != 1:
            raise ValueError(f"pad_left must be a 1-D tensor [B], got shape {tuple(pad_left.shape)}")
        # the value check reads the tensor back; inside a CUDA graph capture nothing can be read back (the worker's
        # batches are built valid, and were checked by the eager step that ran before the capture)
        capturing = pad_left.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and (bool((pad_left < 0).any()) or bool((pad_left > T).any())):
            raise ValueError(f"pad_left values must lie in [0, T={T}], got {pad_left.tolist()}")
        t = torch.arange(T, device=pad_left.device)
        return cls(is_pad=t[None, :] < pad_left[:, None], shift_from_state=t[None, :] <= pad_left[:, None],
                   all_pad=pad_left == T)


def token_shift(x: Tensor, shift: Tensor, pad: Padding | None) -> tuple[Tensor, Tensor]:
    """(x_{t-1} for every t, new shift state). x [B, T, C]; shift [B, C] is x_{-1}. Pads never feed the shift."""
    prev = torch.cat([shift[:, None, :].to(x.dtype), x[:, :-1]], dim=1)
    last = x[:, -1].clone()  # not a view of x: a compiled graph must not return views of its intermediates
    if pad is not None:
        prev = torch.where(pad.shift_from_state[..., None], shift[:, None, :].to(x.dtype), prev)
        last = torch.where(pad.all_pad[:, None], shift.to(x.dtype), last)
    return prev, last


class TimeMix(nn.Module):
    """RWKV-7 attention ("time mixing") of one block. Parameter names/shapes = BlinkDL's `blocks.i.att.*`."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N

        def vec() -> nn.Parameter:
            return nn.Parameter(torch.zeros(1, 1, C))

        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (vec() for _ in range(6))
        self.w0, self.w1, self.w2 = vec(), nn.Parameter(torch.zeros(C, cfg.d_decay)), nn.Parameter(torch.zeros(cfg.d_decay, C))
        self.a0, self.a1, self.a2 = vec(), nn.Parameter(torch.zeros(C, cfg.d_aaa)), nn.Parameter(torch.zeros(cfg.d_aaa, C))
        if layer_id > 0:  # layer 0 defines v_first; its value-residual LoRA would be unused
            self.v0, self.v1, self.v2 = vec(), nn.Parameter(torch.zeros(C, cfg.d_mv)), nn.Parameter(torch.zeros(cfg.d_mv, C))
        self.g1, self.g2 = nn.Parameter(torch.zeros(C, cfg.d_gate)), nn.Parameter(torch.zeros(cfg.d_gate, C))
        self.k_k, self.k_a = vec(), vec()
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUP_NORM_EPS)

    # Block.forward runs the three parts, before_wkv -> wkv -> after_wkv (the outer two compiled when asked)
    def before_wkv(self, x: Tensor, v_first: Tensor | None, shift: Tensor, pad: Padding | None) -> tuple[Tensor, ...]:
        """Everything up to the WKV operator: (r, w, k, v, a, b) in the operator's dtype, [B, T, C] each (v is also
        layer 0's v_first), the bonus term (Σ_head r ⊙ k ⊙ r_k) v, the output gate g, and the new shift state."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        prev, new_shift = token_shift(x, shift, pad)
        xx = prev - x
        xr, xw, xk, xv, xa, xg = (x + xx * m for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2).float()) - 0.5
        if v_first is not None:  # every layer but 0 (not `layer_id > 0`: torch.compile would compile each layer apart)
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)
        bonus = (r * k * self.r_k.view(C)).view(B, T, H, N).sum(dim=-1, keepdim=True) * v.view(B, T, H, N)

        # WKV inputs; at padded positions the step is the identity (decay 1, no write, no state-dependent update)
        wk_w, wk_k, wk_v, wk_a, wk_b = w, k, v, -kk, kk * a
        if pad is not None:
            keep = (~pad.is_pad)[..., None]
            wk_w = torch.where(keep, wk_w, torch.full_like(wk_w, PAD_DECAY_LOGIT))
            wk_k, wk_v, wk_a, wk_b = (t * keep for t in (wk_k, wk_v, wk_a, wk_b))
        dt = r.dtype
        return (*(t.to(dt) for t in (r, wk_w, wk_k, wk_v, wk_a, wk_b)), bonus, g, new_shift)

    def wkv(self, wkv_in: list[Tensor], s0: Tensor | None, wkv) -> tuple[Tensor, Tensor]:
        B, T, C = wkv_in[0].shape
        return wkv(*(t.view(B, T, self.n_head, self.head_size) for t in wkv_in), s0)

    def after_wkv(self, y: Tensor, bonus: Tensor, g: Tensor) -> Tensor:
        """GroupNorm of the WKV output y [B, T, H, N], plus the bonus [B, T, H, N], gated by g [B, T, C], projected:
        the attention output [B, T, C]."""
        B, T, H, N = y.shape
        y = self.ln_x(y.reshape(B * T, H * N).float()).view(B, T, H, N)
        return self.output((y + bonus).view(B, T, H * N) * g)


class ChannelMix(nn.Module):
    """RWKV-7 FFN ("channel mixing"): token shift, relu², no gate. Names/shapes = BlinkDL's `blocks.i.ffn.*`."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, cfg.ffn_dim, bias=False)
        self.value = nn.Linear(cfg.ffn_dim, C, bias=False)

    def forward(self, x: Tensor, shift: Tensor, pad: Padding | None) -> tuple[Tensor, Tensor]:
        prev, new_shift = token_shift(x, shift, pad)
        h = torch.relu(self.key(x + (prev - x) * self.x_k)) ** 2
        return self.value(h), new_shift


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x: Tensor, v_first: Tensor | None, state: LayerState, s0: Tensor | None, pad: Padding | None,
                wkv, compile_backend: str | None = None) -> tuple[Tensor, Tensor, LayerState]:
        """One block. With `compile_backend`, the work before and after the WKV operator (norms, token shifts,
        projections, LoRAs, FFN: mostly elementwise, memory-bound work) runs as two torch.compile'd graphs; the WKV
        operator itself always runs outside them, as it does without compile."""
        if (v_first is None) != (self.layer_id == 0):
            raise ValueError(f"block {self.layer_id}: v_first comes from block 0 and is needed by every later block")
        if self.layer_id == 0:
            x = self.ln0(x)
        if compile_backend is None:
            before, after = Block.attention_in, Block.attention_out_and_ffn
        else:
            before, after = compiled_block_segments(compile_backend)
            mark_batch_and_time_dynamic(x, state.att_shift, state.ffn_shift, pad)
        *wkv_in, bonus, g, att_shift = before(self, x, v_first, state.att_shift, pad)
        y, sT = self.att.wkv(wkv_in, s0, wkv)
        if self.layer_id == 0:
            v_first = wkv_in[3]
        if compile_backend is not None:
            mark_batch_and_time_dynamic(y, bonus, g)
        x, ffn_shift = after(self, x, y, bonus, g, state.ffn_shift, pad)
        return x, v_first, LayerState(att_shift, sT, ffn_shift)

    def attention_in(self, x: Tensor, v_first: Tensor | None, shift: Tensor, pad: Padding | None) -> tuple[Tensor, ...]:
        return self.att.before_wkv(self.ln1(x), v_first, shift, pad)

    def attention_out_and_ffn(self, x: Tensor, y: Tensor, bonus: Tensor, g: Tensor, shift: Tensor,
                              pad: Padding | None) -> tuple[Tensor, Tensor]:
        x = x + self.att.after_wkv(y, bonus, g)
        ffn, ffn_shift = self.ffn(self.ln2(x), shift, pad)
        return x + ffn, ffn_shift


_COMPILED_SEGMENTS: dict[str, tuple] = {}
# graphs per segment: layer 0 or not x padded or not x autocast or not, each compiled once with dynamic batch and time
_RECOMPILE_LIMIT = 32


def compiled_block_segments(backend: str) -> tuple:
    """Block.attention_in and Block.attention_out_and_ffn through torch.compile (built on first use: importing the
    model does not import torch._dynamo). One pair of compiled functions serves every block of every model. (A
    worker's GPU step replays whole micro-steps as CUDA graphs itself: worker/fast_step.py.)"""
    if backend not in _COMPILED_SEGMENTS:
        import torch._dynamo

        config = torch._dynamo.config
        config.cache_size_limit = max(config.cache_size_limit, _RECOMPILE_LIMIT)
        _COMPILED_SEGMENTS[backend] = (torch.compile(Block.attention_in, backend=backend),
                                       torch.compile(Block.attention_out_and_ffn, backend=backend))
    return _COMPILED_SEGMENTS[backend]


def mark_batch_and_time_dynamic(*items) -> None:
    """Ask torch.compile for graphs general in batch size and length (dims 0 and 1 of [B, T, ...] tensors, dim 0 of
    [B, C] states), so that a new prompt length or a last, smaller batch reuses the compiled graph."""
    from torch._dynamo import maybe_mark_dynamic

    for item in items:
        if isinstance(item, Padding):
            marks = [(item.is_pad, (0, 1)), (item.shift_from_state, (0, 1)), (item.all_pad, (0,))]
        elif item is not None:
            marks = [(item, (0, 1) if item.dim() > 2 else (0,))]
        else:
            marks = []
        for t, dims in marks:
            for d in dims:
                maybe_mark_dynamic(t, d)


class RWKV7(nn.Module):
    """RWKV-7 G1 language model. `kernel` picks the WKV operator (see `wkv_operator`); parameters start at zero:
    use model.init.init_weights (from scratch) or model.checkpoint (pretrained) to fill them."""

    def __init__(self, cfg: ModelConfig, kernel: str = "auto", compile_backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.kernel = kernel
        # torch.compile backend for the blocks' work around the WKV operator in training forwards (None: eager).
        # Evaluation, decoding and single-token calls stay eager: they would each need graphs of their own.
        self.compile_backend = compile_backend
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self._fs_checked: set[FSConfig] = set()

    @property
    def n_layer(self) -> int:
        return self.cfg.n_layer

    def zero_state(self, batch_size: int, device: torch.device | str | None = None) -> list[LayerState]:
        cfg, device = self.cfg, device or self.emb.weight.device
        H, N, C = cfg.n_head, cfg.head_size, cfg.n_embd
        return [LayerState(torch.zeros(batch_size, C, device=device),
                           torch.zeros(batch_size, H, N, N, device=device),
                           torch.zeros(batch_size, C, device=device)) for _ in range(cfg.n_layer)]

    def make_fs_gates(self, fs: FSConfig) -> FSGates:
        """Gate parameters for `fs` on this model, on the model's device."""
        cfg = self.cfg
        return FSGates(fs, cfg.n_layer, cfg.n_head, cfg.n_embd).to(self.emb.weight.device)

    def logits(self, hidden: Tensor) -> Tensor:
        """LM head on the final hidden states (after ln_out): float32 logits [..., V]."""
        return self.head(hidden).float()

    def forward(self, idx: Tensor, state: list[LayerState] | None = None, fs: FSConfig | None = None,
                fs_gates: FSGates | None = None, pad_left: Tensor | None = None,
                return_hidden: bool = False) -> tuple[Tensor, list[LayerState]]:
        """idx [B, T] -> (logits [B, T, V] float32, or the hidden after ln_out if return_hidden; final states).

        state: per block, the initial token-shift states and an explicit WKV seed (None: zeros).
        fs + fs_gates: Future-Seed on for this call; the FS seed is added to the explicit WKV seed.
        pad_left[b]: number of left padding tokens in row b; pads affect no real position and no state.
        """
        B, T = idx.shape
        if T < 1:
            raise ValueError("idx must hold at least one token per row")
        seeded = self._check_fs(fs, fs_gates)
        if state is None:
            state = self.zero_state(B, idx.device)
        elif len(state) != self.n_layer:
            raise ValueError(f"state has {len(state)} layers, the model has {self.n_layer}")
        pad = Padding.build(pad_left.to(idx.device), T) if pad_left is not None else None
        if pad is not None and pad.is_pad.shape[0] != B:
            raise ValueError(f"pad_left has {pad.is_pad.shape[0]} rows, idx has {B}")
        wkv = wkv_operator(self.kernel)
        compile_backend = self.compile_backend if self.training and torch.is_grad_enabled() and T > 1 else None

        x = self.emb(idx)
        v_first = None
        final: list[LayerState] = []
        for i, block in enumerate(self.blocks):
            s0 = state[i].wkv
            if i in seeded:  # the residual stream entering block i, at the last (real: pads are on the left) token
                s0 = s0 + future_seed(final[i - 1].wkv, i, self.n_layer, fs, fs_gates, x_in=x[:, -1])
            x, v_first, layer_state = block(x, v_first, state[i], s0, pad, wkv, compile_backend)
            final.append(layer_state)
        x = self.ln_out(x)
        return (x if return_hidden else self.logits(x)), final

    def _check_fs(self, fs: FSConfig | None, fs_gates: FSGates | None) -> set[int]:
        """Validate an FS request (once per configuration) and return the seeded layers."""
        if fs is None:
            if fs_gates is not None:
                raise ValueError("fs_gates given without fs: pass the FS configuration too")
            return set()
        if fs_gates is None:
            raise ValueError("fs is given but fs_gates is None: build them with model.make_fs_gates(fs)")
        if fs not in self._fs_checked:
            for message in fs.check_for_model(self.n_layer):
                warnings.warn(f"Future-Seed: {message}", stacklevel=2)
            self._fs_checked.add(fs)
        cfg = self.cfg
        if (fs_gates.fs != fs or fs_gates.n_layer != cfg.n_layer or fs_gates.n_head != cfg.n_head
                or fs_gates.n_embd != cfg.n_embd):
            raise ValueError("fs_gates were built for a different FS configuration or model shape")
        return set(fs.seeded_layers(self.n_layer))
