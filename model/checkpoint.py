"""Checkpoint I/O for RWKV7: BlinkDL .pth, the Hugging Face layout of the rwkv7-hf / fla ports, and fsearch's own.

All loaders are strict: a missing key, an unexpected key or a wrong shape raises ValueError naming the key (and
both shapes). Tensors are cast to float32 (fsearch's master weights). Documented reshapes, nothing else:

- BlinkDL: `blocks.0.att.v0/v1/v2` are dropped if present (the official implementations ignore them: layer 0
  defines v_first); a [C] vector may stand for a [1, 1, C] parameter (some exports store w0 flat).
- Hugging Face (rwkv7-hf / fla naming, the map in `hf_name`): LoRA matrices are stored transposed (nn.Linear
  layout) and the LoRA bias w0/a0/v0 flat as `*_lora.lora.2.bias`; `attn.k_k`, `attn.k_a`, `ffn.x_k` are flat [C];
  `attn.x_*` keep [1, 1, C]; `attn.r_k` is [H, N].
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.config import BYTE_VOCAB, WORLD_VOCAB, ModelConfig
from model.fs_config import FSConfig
from model.future_seed import FSGates
from model.rwkv7 import RWKV7

UNUSED_BLINKDL_KEYS = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
FSEARCH_FORMAT = "fsearch-rwkv7"
FSEARCH_FORMAT_VERSION = 1
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"


# strict state-dict loading ---------------------------------------------------------------------------------------
def _as_expected_shape(key: str, value: Tensor, expected: torch.Size) -> Tensor:
    if value.shape == expected:
        return value
    flat_vector = len(expected) == 3 and expected[:2] == (1, 1) and value.dim() == 1 and value.numel() == expected[2]
    if flat_vector:
        return value.view(expected)
    raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model expects {tuple(expected)}")


def load_state_strict(model: RWKV7, state: dict[str, Tensor], source: str = "checkpoint") -> RWKV7:
    """Copy `state` (BlinkDL names) into `model` as float32; any missing/unexpected key or bad shape -> ValueError."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{source} is missing key {missing[0]!r} (expected shape {tuple(expected[missing[0]].shape)})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ValueError(f"{source} has unexpected key {unexpected[0]!r} (shape {tuple(state[unexpected[0]].shape)})"
                         + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    fixed = {k: _as_expected_shape(k, v, expected[k].shape).to(torch.float32) for k, v in state.items()}
    model.load_state_dict(fixed, strict=True)
    return model


def _shape(state: dict[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"checkpoint is missing key {key!r}")
    return tuple(state[key].shape)


def _tokenizer_for_vocab(vocab: int) -> str:
    if vocab == WORLD_VOCAB:
        return "world"
    if vocab == BYTE_VOCAB:
        return "byte"
    raise ValueError(f"cannot infer the tokenizer from vocab_size={vocab} (known: {WORLD_VOCAB} world, "
                     f"{BYTE_VOCAB} byte); pass tokenizer=")


# BlinkDL .pth ----------------------------------------------------------------------------------------------------
def config_from_blinkdl(state: dict[str, Tensor], tokenizer: str | None = None) -> ModelConfig:
    """Infer the ModelConfig from BlinkDL tensor shapes."""
    V, C = _shape(state, "emb.weight")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not layers:
        raise ValueError("checkpoint has no blocks.* keys")
    L = max(layers) + 1
    rk = _shape(state, "blocks.0.att.r_k")
    if len(rk) != 2:
        raise ValueError(f"checkpoint tensor 'blocks.0.att.r_k' has shape {rk}, expected [n_head, head_size]")
    H, N = rk
    F, C_ffn = _shape(state, "blocks.0.ffn.key.weight")
    if C_ffn != C:
        raise ValueError(f"checkpoint tensor 'blocks.0.ffn.key.weight' has shape {(F, C_ffn)}, expected [ffn, {C}]")
    if H * N != C:
        raise ValueError(f"checkpoint tensor 'blocks.0.att.r_k' has shape {rk}: n_head*head_size != n_embd={C}")
    v_key = "blocks.1.att.v1" if L > 1 else "blocks.0.att.v1"
    d_mv = state[v_key].shape[1] if v_key in state else None
    return ModelConfig(vocab_size=V, n_layer=L, n_embd=C, head_size=N, ffn_dim=F,
                       d_decay=_shape(state, "blocks.0.att.w1")[1], d_aaa=_shape(state, "blocks.0.att.a1")[1],
                       d_mv=d_mv, d_gate=_shape(state, "blocks.0.att.g1")[1],
                       tokenizer=tokenizer or _tokenizer_for_vocab(V))


def model_from_blinkdl_state(state: dict[str, Tensor], kernel: str = "auto", tokenizer: str | None = None) -> RWKV7:
    state = {k: v for k, v in state.items() if k not in UNUSED_BLINKDL_KEYS}
    model = RWKV7(config_from_blinkdl(state, tokenizer), kernel=kernel)
    return load_state_strict(model, state, "BlinkDL checkpoint")


def load_blinkdl(path: str | Path, kernel: str = "auto", tokenizer: str | None = None) -> RWKV7:
    """A BlinkDL RWKV-7 .pth (plain dict of tensors) -> RWKV7 in float32."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return model_from_blinkdl_state(state, kernel, tokenizer)


def save_blinkdl(model: RWKV7, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Write the BlinkDL layout (the rwkv package loads it; layer 0 has no v0/v1/v2, which it does not need)."""
    torch.save({k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}, Path(path))


# Hugging Face (rwkv7-hf / fla) -----------------------------------------------------------------------------------
_HF_TOP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
           "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
_HF_PART = {"att": "attn", "ffn": "ffn", "ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
_HF_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
_HF_LORA = {"0": "2.bias", "1": "0.weight", "2": "2.weight"}
_HF_FLAT = re.compile(r"blocks\.\d+\.(att\.(k_k|k_a|[wav]0)|ffn\.x_k)$")  # [1,1,C] stored flat in the HF layout


def _hf_shape(key: str, shape: torch.Size) -> tuple[int, ...]:
    """Shape of a BlinkDL-named parameter as stored in the Hugging Face layout."""
    if hf_name(key)[1]:
        return tuple(reversed(shape))
    return (shape[-1],) if _HF_FLAT.search(key) else tuple(shape)


def hf_name(key: str) -> tuple[str, bool]:
    """BlinkDL key -> (Hugging Face key, stored transposed?)."""
    if key in _HF_TOP:
        return _HF_TOP[key], False
    parts = key.split(".")
    if parts[0] != "blocks" or len(parts) < 4:
        raise ValueError(f"no Hugging Face name for key {key!r}")
    parts[0], parts[2] = "model.layers", _HF_PART[parts[2]]
    transposed = False
    if parts[2] == "attn" and re.fullmatch(r"[wavg][012]", parts[3]):
        kind, num = parts[3]
        parts[3] = f"{kind}_lora.lora.{_HF_LORA[num]}"
        transposed = num in "12"
    elif parts[2] == "attn" and parts[3] in _HF_PROJ:
        parts[3] = _HF_PROJ[parts[3]]
    return ".".join(parts), transposed


def _hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "attn_mode": "chunk",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
        "head_dim": cfg.head_size, "num_heads": cfg.n_head, "attention_hidden_size": cfg.n_embd,
        "value_dim": [cfg.n_embd] * cfg.n_layer, "intermediate_size": cfg.ffn_dim,
        "hidden_ratio": cfg.ffn_dim / cfg.n_embd, "decay_low_rank_dim": cfg.d_decay,
        "a_low_rank_dim": cfg.d_aaa, "v_low_rank_dim": cfg.d_mv, "gate_low_rank_dim": cfg.d_gate,
        "hidden_act": "sqrelu", "norm_first": True, "norm_bias": True, "norm_eps": cfg.norm_eps,
        "fuse_norm": False, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
        "torch_dtype": "float32", "fsearch_tokenizer": cfg.tokenizer,
    }


def save_hf(model: RWKV7, directory: str | Path) -> Path:
    """config.json + model.safetensors in the rwkv7-hf / fla naming (float32)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in model.state_dict().items():
        name, transposed = hf_name(key)
        value = value.detach().to("cpu", torch.float32)
        value = value.t() if transposed else (value.reshape(-1) if _HF_FLAT.search(key) else value)
        tensors[name] = value.contiguous()
    save_file(tensors, str(out / HF_WEIGHTS), metadata={"format": "pt"})
    (out / HF_CONFIG).write_text(json.dumps(_hf_config(model.cfg), indent=2) + "\n")
    return out


def _config_from_hf(conf: dict[str, Any], tokenizer: str | None) -> ModelConfig:
    try:
        C, V = conf["hidden_size"], conf["vocab_size"]
        return ModelConfig(vocab_size=V, n_layer=conf["num_hidden_layers"], n_embd=C, head_size=conf["head_dim"],
                           ffn_dim=conf.get("intermediate_size") or int(C * conf.get("hidden_ratio", 4)),
                           d_decay=conf["decay_low_rank_dim"], d_aaa=conf["a_low_rank_dim"],
                           d_mv=conf["v_low_rank_dim"], d_gate=conf["gate_low_rank_dim"],
                           norm_eps=conf.get("norm_eps", 1e-5),
                           tokenizer=tokenizer or conf.get("fsearch_tokenizer") or _tokenizer_for_vocab(V))
    except KeyError as e:
        raise ValueError(f"{HF_CONFIG} is missing field {e.args[0]!r}") from None


def load_hf(directory: str | Path, kernel: str = "auto", tokenizer: str | None = None) -> RWKV7:
    """A Hugging Face-format RWKV-7 directory (config.json + model.safetensors, rwkv7-hf / fla naming) -> RWKV7."""
    from safetensors.torch import load_file

    d = Path(directory)
    for f in (HF_CONFIG, HF_WEIGHTS):
        if not (d / f).exists():
            raise ValueError(f"{d} has no {f}")
    conf = json.loads((d / HF_CONFIG).read_text())
    model = RWKV7(_config_from_hf(conf, tokenizer), kernel=kernel)
    hf = load_file(str(d / HF_WEIGHTS))
    expected = model.state_dict()
    state, used = {}, set()
    for key, ref in expected.items():
        name, transposed = hf_name(key)
        if name not in hf:
            raise ValueError(f"Hugging Face checkpoint is missing key {name!r} (for {key!r}, expected shape "
                             f"{_hf_shape(key, ref.shape)})")
        value = hf[name]
        if tuple(value.shape) != _hf_shape(key, ref.shape):
            raise ValueError(f"Hugging Face checkpoint tensor {name!r} has shape {tuple(value.shape)}, "
                             f"the model expects {_hf_shape(key, ref.shape)}")
        state[key] = value.t() if transposed else value
        used.add(name)
    unexpected = sorted(set(hf) - used)
    if unexpected:
        raise ValueError(f"Hugging Face checkpoint has unexpected key {unexpected[0]!r} "
                         f"(shape {tuple(hf[unexpected[0]].shape)})")
    return load_state_strict(model, state, "Hugging Face checkpoint")


# fsearch's own -------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    model: RWKV7
    fs_gates: FSGates | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def save(model: RWKV7, path: str | Path, extra: dict[str, Any] | None = None, fs_gates: FSGates | None = None) -> Path:
    """One safetensors file: model weights ("model." prefix), optional FS gates ("fs_gates." prefix), and as
    metadata the ModelConfig, the FS configuration and `extra` (all JSON)."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FSEARCH_FORMAT, "format_version": str(FSEARCH_FORMAT_VERSION),
            "model_config": model.cfg.model_dump_json(), "extra": json.dumps(extra or {})}
    if fs_gates is not None:
        tensors.update({f"fs_gates.{k}": v.detach().to("cpu", torch.float32).contiguous()
                        for k, v in fs_gates.state_dict().items()})
        meta["fs_config"] = fs_gates.fs.model_dump_json()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def load(path: str | Path, kernel: str = "auto") -> Checkpoint:
    """Read a file written by `save`: the model, the FS gates (if saved) and `extra`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FSEARCH_FORMAT:
        raise ValueError(f"{path} is not an fsearch checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version") != str(FSEARCH_FORMAT_VERSION):
        raise ValueError(f"{path} has format_version {meta.get('format_version')!r}, "
                         f"this fsearch reads {FSEARCH_FORMAT_VERSION}")
    tensors = load_file(str(path))
    model = RWKV7(ModelConfig.model_validate_json(meta["model_config"]), kernel=kernel)
    load_state_strict(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, f"checkpoint {path}")
    gates = None
    gate_tensors = {k[9:]: v for k, v in tensors.items() if k.startswith("fs_gates.")}
    if "fs_config" in meta:
        gates = model.make_fs_gates(FSConfig.model_validate_json(meta["fs_config"]))
        expected = gates.state_dict()
        for key in expected:
            if key not in gate_tensors:
                raise ValueError(f"checkpoint {path} is missing FS gate tensor {key!r}")
            if gate_tensors[key].shape != expected[key].shape:
                raise ValueError(f"checkpoint {path}: FS gate tensor {key!r} has shape "
                                 f"{tuple(gate_tensors[key].shape)}, expected {tuple(expected[key].shape)}")
        gates.load_state_dict(gate_tensors, strict=True)
    elif gate_tensors:
        raise ValueError(f"checkpoint {path} has FS gate tensors but no fs_config")
    return Checkpoint(model=model, fs_gates=gates, extra=json.loads(meta.get("extra", "{}")))


def load_any(path: str | Path, kernel: str = "auto") -> RWKV7:
    """A model from any supported source: a Hugging Face directory (config.json + model.safetensors), an fsearch
    checkpoint (.safetensors written by `save`), a BlinkDL state dict (.pth, or .safetensors without fsearch
    metadata). A missing path raises FileNotFoundError."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model checkpoint {p} does not exist")
    if p.is_dir():
        return load_hf(p, kernel=kernel)
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(p), framework="pt") as f:
            is_fsearch = (f.metadata() or {}).get("format") == FSEARCH_FORMAT
        if is_fsearch:
            return load(p, kernel=kernel).model
        return model_from_blinkdl_state(load_file(str(p)), kernel=kernel)  # a BlinkDL state dict as safetensors
    if p.suffix == ".pth":
        return load_blinkdl(p, kernel=kernel)
    raise ValueError(f"model checkpoint {p}: unknown format (expected a Hugging Face directory, an fsearch "
                     f".safetensors file or a BlinkDL .pth)")
