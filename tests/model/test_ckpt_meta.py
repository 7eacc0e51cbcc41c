"""model/ckpt_meta.py: checkpoint names, shapes and sizes without torch (the tests may use torch to write files)."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from model.ckpt_meta import CheckpointError, blinkdl_meta, model_config_fields, read_checkpoint_meta
from model.config import ModelConfig

REPO = Path(__file__).resolve().parents[2]


def blinkdl_state(L: int = 3, C: int = 32, H: int = 2, V: int = 50, F: int = 96, dw: int = 8, da: int = 8,
                  dv: int = 4, dg: int = 16, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A state dict with the BlinkDL RWKV-7 key names and shapes; values are irrelevant."""
    N = C // H
    z = lambda *s: torch.zeros(*s, dtype=dtype)  # noqa: E731
    sd = {"emb.weight": z(V, C), "blocks.0.ln0.weight": z(C), "blocks.0.ln0.bias": z(C),
          "ln_out.weight": z(C), "ln_out.bias": z(C), "head.weight": z(V, C)}
    for i in range(L):
        b = f"blocks.{i}."
        sd.update({b + "ln1.weight": z(C), b + "ln1.bias": z(C), b + "ln2.weight": z(C), b + "ln2.bias": z(C)})
        for x in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            sd[b + "att." + x] = z(1, 1, C)
        sd.update({b + "att.w1": z(C, dw), b + "att.w2": z(dw, C), b + "att.a1": z(C, da), b + "att.a2": z(da, C),
                   b + "att.g1": z(C, dg), b + "att.g2": z(dg, C), b + "att.r_k": z(H, N)})
        if i > 0:
            sd.update({b + "att.v0": z(1, 1, C), b + "att.v1": z(C, dv), b + "att.v2": z(dv, C)})
        for p in ("receptance", "key", "value", "output"):
            sd[b + f"att.{p}.weight"] = z(C, C)
        sd.update({b + "att.ln_x.weight": z(C), b + "att.ln_x.bias": z(C), b + "ffn.x_k": z(1, 1, C),
                   b + "ffn.key.weight": z(F, C), b + "ffn.value.weight": z(C, F)})
    return sd


def test_blinkdl_pth_written_by_torch_save(tmp_path):
    sd = blinkdl_state()
    path = tmp_path / "m.pth"
    torch.save(sd, path)
    meta = read_checkpoint_meta(path)
    assert meta["format"] == "blinkdl"
    assert (meta["n_layer"], meta["n_embd"], meta["vocab_size"], meta["head_size"], meta["n_head"]) == (3, 32, 50, 16, 2)
    assert (meta["ffn_dim"], meta["d_decay"], meta["d_aaa"], meta["d_mv"], meta["d_gate"]) == (96, 8, 8, 4, 16)
    assert meta["shapes"] == {k: list(v.shape) for k, v in sd.items()}
    assert set(meta["dtypes"].values()) == {"bfloat16"}
    assert meta["tokenizer"] is None  # vocab 50 is neither the World nor the byte vocabulary


def test_world_vocab_means_world_tokenizer_and_twelve_layers(tmp_path):
    # the shapes of the 0.1B g1d checkpoint the round ports use (V=65536, C=768, L=12, H=12, N=64), on the meta level
    shapes = {k: tuple(v.shape) for k, v in blinkdl_state(L=12, C=16, H=1, V=8).items()}
    shapes["emb.weight"] = (65536, 768)
    shapes["blocks.0.att.r_k"] = (12, 64)
    meta = blinkdl_meta(shapes)
    assert (meta["n_layer"], meta["n_head"], meta["head_size"], meta["tokenizer"]) == (12, 12, 64, "world")


def test_parameters_ordered_dict_float32_and_legacy_format(tmp_path):
    from collections import OrderedDict

    sd = OrderedDict((k, torch.nn.Parameter(v.float())) for k, v in blinkdl_state(L=2).items())
    new, old = tmp_path / "new.pth", tmp_path / "old.pth"
    torch.save(sd, new)
    torch.save(sd, old, _use_new_zipfile_serialization=False)
    for path in (new, old):
        meta = read_checkpoint_meta(path)
        assert meta["n_layer"] == 2 and meta["d_mv"] == 4
        assert set(meta["dtypes"].values()) == {"float32"}


def test_single_layer_takes_value_lora_rank_from_layer_zero(tmp_path):
    sd = blinkdl_state(L=1)
    sd.update({"blocks.0.att.v1": torch.zeros(32, 6)})
    torch.save(sd, tmp_path / "one.pth")
    assert read_checkpoint_meta(tmp_path / "one.pth")["d_mv"] == 6


def test_agrees_with_the_model_package_on_every_format(tmp_path):
    """fsearch's own writers (model/checkpoint.py): BlinkDL .pth, HF folder, fsearch safetensors."""
    ckpt = pytest.importorskip("model.checkpoint")
    from model.config import preset
    from model.rwkv7 import RWKV7

    cfg = preset("tiny")
    model = RWKV7(cfg)
    ckpt.save_blinkdl(model, tmp_path / "b.pth")
    ckpt.save_hf(model, tmp_path / "hf")
    ckpt.save(model, tmp_path / "f.safetensors")
    metas = {"blinkdl": read_checkpoint_meta(tmp_path / "b.pth"), "hf": read_checkpoint_meta(tmp_path / "hf"),
             "fsearch": read_checkpoint_meta(tmp_path / "f.safetensors")}
    for fmt, meta in metas.items():
        assert meta["format"] == fmt
        assert ModelConfig(**model_config_fields(meta)) == cfg, fmt
        assert meta["shapes"], fmt
    assert metas["blinkdl"]["shapes"] == {k: list(v.shape) for k, v in model.state_dict().items()}


def test_blinkdl_state_dict_stored_as_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.float().contiguous() for k, v in blinkdl_state(L=5).items()}, str(tmp_path / "b.safetensors"))
    meta = read_checkpoint_meta(tmp_path / "b.safetensors")
    assert meta["format"] == "blinkdl" and meta["n_layer"] == 5


def test_hf_folder_with_fla_config_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "rwkv7", "hidden_size": 768, "num_hidden_layers": 12, "head_dim": 64, "vocab_size": 65536,
        "intermediate_size": 3072, "decay_low_rank_dim": 64, "a_low_rank_dim": 64, "v_low_rank_dim": 32,
        "gate_low_rank_dim": 128}))
    meta = read_checkpoint_meta(tmp_path)
    assert (meta["format"], meta["n_layer"], meta["n_head"], meta["tokenizer"]) == ("hf", 12, 12, "world")
    assert ModelConfig(**model_config_fields(meta)).n_params() > 0


def test_importing_and_reading_does_not_import_torch(tmp_path):
    torch.save(blinkdl_state(), tmp_path / "m.pth")
    code = ("import sys; from model.ckpt_meta import read_checkpoint_meta; "
            f"m = read_checkpoint_meta({str(tmp_path / 'm.pth')!r}); assert m['n_layer'] == 3; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class _Evil:
    def __reduce__(self):
        return (subprocess.check_call, (["touch", "/nonexistent-dir/pwned"],))


def test_a_pickle_that_imports_anything_else_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"emb.weight": _Evil()}))
    with pytest.raises(CheckpointError, match="refusing to load subprocess.check_call"):
        read_checkpoint_meta(path)


@pytest.mark.parametrize("kind", ["missing", "garbage", "zip_without_pickle", "no_blocks", "not_a_dict", "folder"])
def test_errors_are_one_line_and_name_the_file(tmp_path, kind):
    path = tmp_path / "x.pth"
    if kind == "garbage":
        path.write_bytes(b"\x00\x01not a checkpoint at all" * 10)
    elif kind == "zip_without_pickle":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x/other.txt", "hello")
    elif kind == "no_blocks":
        torch.save({"emb.weight": torch.zeros(3, 4)}, path)
    elif kind == "not_a_dict":
        torch.save([torch.zeros(2)], path)
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(CheckpointError) as e:
        read_checkpoint_meta(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
