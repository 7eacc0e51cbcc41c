"""Checkpoint I/O: fsearch's own format, BlinkDL .pth and the Hugging Face layout; strict loading."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import (config_from_blinkdl, hf_name, load, load_any, load_blinkdl, load_hf, save,
                              save_blinkdl, save_hf)
from model.fs_config import FSConfig


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.filterwarnings("ignore:Future-Seed")  # head_l-style gates start near a no-op (expected here)
def test_fsearch_round_trip_with_gates_and_extra(tmp_path, make_config, make_model, make_tokens):
    model = make_model(make_config(), seed=1)
    fs = FSConfig(variant="head", alpha_init=-3.0, alpha_head_lr=5e-4, layer_start=1, norm=True, clip=1.0)
    gates = model.make_fs_gates(fs)
    with torch.no_grad():
        gates.alpha_head.normal_(generator=torch.Generator().manual_seed(0))
    path = save(model, tmp_path / "ck" / "model.safetensors", extra={"step": 12, "note": "x"}, fs_gates=gates)
    ck = load(path, kernel="reference")
    assert ck.model.cfg == model.cfg and _same_weights(ck.model, model)
    assert ck.extra == {"step": 12, "note": "x"}
    assert ck.fs_gates.fs == fs and torch.equal(ck.fs_gates.alpha_head, gates.alpha_head)
    assert ck.fs_gates.alpha_head.requires_grad and not ck.fs_gates.alpha.requires_grad
    idx = make_tokens(1, 8, 257)
    with torch.no_grad():
        assert torch.equal(ck.model(idx, fs=fs, fs_gates=ck.fs_gates)[0], model(idx, fs=fs, fs_gates=gates)[0])
    no_gates = load(save(model, tmp_path / "plain.safetensors"))
    assert no_gates.fs_gates is None and no_gates.extra == {}


def test_blinkdl_round_trip_and_config_inference(tmp_path, make_config, make_model):
    cfg = make_config(n_layer=2, ffn_dim=160, d_decay=8, d_aaa=12, d_mv=4, d_gate=20)
    model = make_model(cfg, seed=2)
    save_blinkdl(model, tmp_path / "m.pth")
    loaded = load_blinkdl(tmp_path / "m.pth", kernel="reference")
    assert loaded.cfg == cfg and _same_weights(loaded, model)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    state = torch.load(tmp_path / "m.pth", weights_only=True)
    inferred = config_from_blinkdl(state)
    assert (inferred.n_layer, inferred.n_embd, inferred.n_head, inferred.head_size, inferred.ffn_dim) == (2, 64, 4, 16, 160)
    assert (inferred.d_decay, inferred.d_aaa, inferred.d_mv, inferred.d_gate) == (8, 12, 4, 20)
    assert inferred.tokenizer == "byte"


def test_blinkdl_bf16_layer0_value_lora_and_flat_vectors_are_accepted(tmp_path, make_config, make_model):
    """Official training checkpoints carry blocks.0.att.v0/v1/v2 (unused) and may be bf16; w0 may be flat."""
    model = make_model(make_config(n_layer=2), seed=3)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    C = model.cfg.n_embd
    state["blocks.0.att.v0"] = torch.zeros(1, 1, C)
    state["blocks.0.att.v1"] = torch.zeros(C, 8)
    state["blocks.0.att.v2"] = torch.zeros(8, C)
    state["blocks.1.att.w0"] = state["blocks.1.att.w0"].reshape(C)
    torch.save(state, tmp_path / "m.pth")
    loaded = load_blinkdl(tmp_path / "m.pth", kernel="reference")
    assert loaded.blocks[1].att.w0.shape == (1, 1, C) and loaded.blocks[1].att.w0.dtype == torch.float32
    assert torch.equal(loaded.blocks[1].att.w0, model.blocks[1].att.w0.to(torch.bfloat16).float())


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("blocks.1.att.k_a"), "missing key 'blocks.1.att.k_a'"),
    (lambda s: s.__setitem__("blocks.1.att.w2", torch.zeros(8, 64)),
     r"'blocks.1.att.w2' has shape \(8, 64\), the model expects \(16, 64\)"),
    (lambda s: s.__setitem__("blocks.0.ffn.value.weight", torch.zeros(64, 100)),
     r"'blocks.0.ffn.value.weight' has shape \(64, 100\), the model expects \(64, 256\)"),
    (lambda s: s.__setitem__("blocks.1.ffn.s_emb.weight", torch.zeros(3, 3)), "unexpected key 'blocks.1.ffn.s_emb.weight'"),
    (lambda s: s.pop("emb.weight"), "missing key 'emb.weight'"),
])
def test_bad_blinkdl_checkpoints_name_the_key(edit, message, tmp_path, make_config, make_model):
    state = make_model(make_config(n_layer=2), seed=0).state_dict()
    edit(state)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=message):
        load_blinkdl(tmp_path / "bad.pth")


def test_unknown_vocab_needs_an_explicit_tokenizer(tmp_path, make_config, make_model):
    save_blinkdl(make_model(make_config(n_layer=1, vocab_size=1000), seed=0), tmp_path / "m.pth")
    with pytest.raises(ValueError, match="vocab_size=1000"):
        load_blinkdl(tmp_path / "m.pth")
    assert load_blinkdl(tmp_path / "m.pth", tokenizer="byte").cfg.vocab_size == 1000


def test_hf_layout_names_and_shapes(tmp_path, make_config, make_model):
    cfg = make_config(n_layer=2)
    save_hf(make_model(cfg, seed=4), tmp_path / "hf")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    C = cfg.n_embd
    assert conf["model_type"] == "rwkv7" and conf["hidden_size"] == C and conf["num_hidden_layers"] == 2
    assert conf["head_dim"] == 16 and conf["decay_low_rank_dim"] == 16 and conf["v_low_rank_dim"] == 8
    expected = {
        "model.embeddings.weight": (257, C), "model.norm.weight": (C,), "lm_head.weight": (257, C),
        "model.layers.0.pre_norm.weight": (C,), "model.layers.1.attn_norm.bias": (C,),
        "model.layers.1.ffn_norm.weight": (C,),
        "model.layers.1.attn.x_r": (1, 1, C), "model.layers.1.attn.k_k": (C,), "model.layers.1.attn.k_a": (C,),
        "model.layers.1.attn.r_k": (4, 16),
        "model.layers.1.attn.w_lora.lora.0.weight": (16, C), "model.layers.1.attn.w_lora.lora.2.weight": (C, 16),
        "model.layers.1.attn.w_lora.lora.2.bias": (C,), "model.layers.1.attn.a_lora.lora.2.bias": (C,),
        "model.layers.1.attn.v_lora.lora.0.weight": (8, C), "model.layers.1.attn.g_lora.lora.2.weight": (C, 24),
        "model.layers.1.attn.r_proj.weight": (C, C), "model.layers.1.attn.o_proj.weight": (C, C),
        "model.layers.1.attn.g_norm.weight": (C,), "model.layers.1.ffn.x_k": (C,),
        "model.layers.1.ffn.key.weight": (256, C), "model.layers.1.ffn.value.weight": (C, 256),
    }
    for name, shape in expected.items():
        assert tuple(tensors[name].shape) == shape, name
    assert "model.layers.0.attn.v_lora.lora.0.weight" not in tensors
    assert not any("g_lora.lora.2.bias" in n for n in tensors)
    assert hf_name("blocks.3.att.a2") == ("model.layers.3.attn.a_lora.lora.2.weight", True)


def test_bad_hf_checkpoints_name_the_key(tmp_path, make_config, make_model):
    save_hf(make_model(make_config(n_layer=2), seed=4), tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.1.attn.w_lora.lora.0.weight"] = torch.zeros(16, 63)
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"'model.layers.1.attn.w_lora.lora.0.weight' has shape \(16, 63\), "
                                         r"the model expects \(16, 64\)"):
        load_hf(tmp_path / "hf")
    del tensors["model.layers.1.attn.w_lora.lora.0.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"missing key 'model.layers.1.attn.w_lora.lora.0.weight'"):
        load_hf(tmp_path / "hf")


def test_load_any_dispatches_on_the_format(tmp_path, make_config, make_model):
    model = make_model(make_config(n_layer=1), seed=5)
    save_blinkdl(model, tmp_path / "m.pth")
    save_hf(model, tmp_path / "hf")
    save(model, tmp_path / "own.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "blink.safetensors"))
    for source in ("m.pth", "hf", "own.safetensors", "blink.safetensors"):
        assert _same_weights(load_any(tmp_path / source), model), source
    with pytest.raises(FileNotFoundError):
        load_any(tmp_path / "nope.pth")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown format"):
        load_any(tmp_path / "x.bin")


def test_fsearch_load_rejects_other_files(tmp_path, make_config, make_model):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an fsearch checkpoint"):
        load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "missing.safetensors")
