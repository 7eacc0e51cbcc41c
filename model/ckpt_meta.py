"""Checkpoint metadata without torch: parameter names, shapes and the model's size, read from the file alone.

The control plane validates a spec (is `layer_start` below the model's layer count?) on machines without torch, so
this module reads checkpoints the way a file-format reader would:

- BlinkDL `.pth` (what `torch.save(state_dict)` writes): a zip archive holding `<name>/data.pkl`. The pickle is
  replayed by an Unpickler whose `find_class` hands back small stand-ins for torch's tensor-rebuild functions and
  storage classes, and whose `persistent_load` returns a storage stand-in (dtype + element count) instead of reading
  tensor bytes. A rebuilt "tensor" is just its shape and dtype. Nothing outside an allow-list of names is imported,
  so a checkpoint cannot run code here. The pre-1.6 (non-zip) torch format is read the same way.
- Hugging Face folder (model/checkpoint.py `save_hf`, fla's RWKV7Config names): `config.json` with hidden_size,
  num_hidden_layers, head_dim, intermediate_size, *_low_rank_dim, vocab_size (and fsearch_tokenizer when fsearch
  wrote it); tensor shapes from the `*.safetensors` headers.
- fsearch checkpoint (model/checkpoint.py `save`): one safetensors file whose header metadata has
  `format: fsearch-rwkv7` and `model_config` (ModelConfig as JSON). A safetensors file without that metadata is read
  as a BlinkDL state dict stored as safetensors.

`read_checkpoint_meta(path)` returns a dict with at least
  format ("blinkdl" | "hf" | "fsearch"), n_layer, n_embd, vocab_size, head_size, n_head, shapes ({name: [dims]}),
and, when the file says so, ffn_dim, d_decay, d_aaa, d_mv, d_gate, tokenizer and (for .pth) dtypes.
Every problem raises CheckpointError with one line naming the file.
"""
from __future__ import annotations

import codecs
import collections
import io
import json
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.config import BYTE_VOCAB, WORLD_VOCAB

FSEARCH_FORMAT = "fsearch-rwkv7"  # the safetensors metadata tag model/checkpoint.py writes
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_BLOCK_RX = re.compile(r"^blocks\.(\d+)\.")

# torch storage class names -> dtype names
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}


class CheckpointError(Exception):
    """A checkpoint cannot be read or understood (one line, names the file)."""


# ---------------------------------------------------------------------------------------------------------------
# stand-ins for what a torch pickle references
@dataclass(frozen=True)
class StorageType:
    name: str

    @property
    def dtype(self) -> str:
        return _STORAGE_DTYPES.get(self.name, self.name)


@dataclass(frozen=True)
class StorageStub:
    dtype: str
    numel: int | None


@dataclass(frozen=True)
class TensorStub:
    shape: tuple[int, ...]
    dtype: str


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any = None, *rest: Any) -> TensorStub:
    dtype = storage.dtype if isinstance(storage, StorageStub) else "unknown"
    return TensorStub(tuple(int(s) for s in size), dtype)


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    return data


def _opaque(*args: Any, **kwargs: Any) -> None:
    return None


_TORCH_FUNCS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "dict"): dict, ("builtins", "list"): list, ("builtins", "tuple"): tuple,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "int"): int, ("builtins", "float"): float, ("builtins", "str"): str, ("builtins", "bool"): bool,
    ("builtins", "bytes"): bytes, ("builtins", "bytearray"): bytearray, ("builtins", "complex"): complex,
    ("_codecs", "encode"): codecs.encode,
}


class _StubUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if (module, name) in _TORCH_FUNCS:
            return _TORCH_FUNCS[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return StorageType(name)
        if module == "torch" or module.startswith("torch."):
            return _opaque  # dtypes, devices, layouts, hooks: irrelevant to shapes
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a torch state dict)")

    def persistent_load(self, pid: Any) -> Any:
        # zip format: ('storage', storage_type, key, location, numel); legacy: (..., view_metadata) as well
        if isinstance(pid, tuple) and pid and pid[0] == "storage":
            storage_type = pid[1]
            dtype = storage_type.dtype if isinstance(storage_type, StorageType) else "unknown"
            numel = pid[4] if len(pid) > 4 and isinstance(pid[4], int) else None
            return StorageStub(dtype, numel)
        return StorageStub("unknown", None)


def _unpickle(data: bytes | Any, path: Path) -> Any:
    try:
        fh = data if hasattr(data, "read") else io.BytesIO(data)
        return _StubUnpickler(fh).load()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the pickled state dict ({type(e).__name__}: {e})") from None


def _read_torch_pickle(path: Path) -> Any:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not names:
                raise CheckpointError(f"{path}: a zip archive without data.pkl is not a torch checkpoint")
            return _unpickle(z.read(sorted(names, key=len)[0]), path)
    # legacy format: magic number, protocol version, sys info, then the object
    with open(path, "rb") as fh:
        try:
            unpickler = _StubUnpickler(fh)
            magic = unpickler.load()
            if magic != TORCH_LEGACY_MAGIC:
                raise CheckpointError(f"{path}: not a torch checkpoint (neither a zip archive nor the legacy format)")
            unpickler.load()
            unpickler.load()
            return unpickler.load()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------------------
def blinkdl_meta(shapes: dict[str, tuple[int, ...]], path: Path | str = "<state dict>") -> dict[str, Any]:
    """Model size from BlinkDL RWKV-7 state-dict key names and shapes."""

    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{path}: no key {key!r}; not an RWKV-7 state dict in BlinkDL layout")
        return shapes[key]

    layers = [int(m.group(1)) for k in shapes if (m := _BLOCK_RX.match(k))]
    if not layers:
        raise CheckpointError(f"{path}: no 'blocks.<i>.' keys; not an RWKV-7 state dict in BlinkDL layout")
    vocab, n_embd = need("emb.weight")
    n_head, head_size = need("blocks.0.att.r_k")
    meta: dict[str, Any] = {
        "format": "blinkdl", "n_layer": 1 + max(layers), "n_embd": n_embd, "vocab_size": vocab,
        "head_size": head_size, "n_head": n_head, "ffn_dim": need("blocks.0.ffn.key.weight")[0],
        "tokenizer": _tokenizer_for_vocab(vocab),
    }
    v1 = "blocks.1.att.v1" if meta["n_layer"] > 1 else "blocks.0.att.v1"  # layer 0 has no value-residual LoRA
    for field, key in (("d_decay", "blocks.0.att.w1"), ("d_aaa", "blocks.0.att.a1"), ("d_mv", v1),
                       ("d_gate", "blocks.0.att.g1")):
        if key in shapes:
            meta[field] = shapes[key][1]
    return meta


def _pth_meta(path: Path) -> dict[str, Any]:
    obj = _read_torch_pickle(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, TensorStub)}
    if not tensors:
        raise CheckpointError(f"{path}: the state dict holds no tensors")
    shapes = {k: v.shape for k, v in tensors.items()}
    meta = blinkdl_meta(shapes, path)
    meta["shapes"] = {k: list(v) for k, v in shapes.items()}
    meta["dtypes"] = {k: v.dtype for k, v in tensors.items()}
    return meta


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file, or None if the file is not one."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if n < 2 or 8 + n > size:
            return None
        raw = fh.read(n)
    if not raw.lstrip().startswith(b"{"):
        return None
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    return header if isinstance(header, dict) else None


def _tensor_shapes(header: dict[str, Any]) -> dict[str, list[int]]:
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def _tokenizer_for_vocab(vocab: int) -> str | None:
    return {WORLD_VOCAB: "world", BYTE_VOCAB: "byte"}.get(vocab)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _int(cfg: dict[str, Any], path: Path, *names: str, required: bool = True) -> int | None:
    for n in names:
        if isinstance(cfg.get(n), int) and not isinstance(cfg.get(n), bool):
            return cfg[n]
    if required:
        raise CheckpointError(f"{path}: config has no integer {' / '.join(names)}")
    return None


def _hf_meta(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    cfg = _read_json(cfg_path)
    n_embd = _int(cfg, cfg_path, "hidden_size", "n_embd")
    n_head = _int(cfg, cfg_path, "num_heads", "num_attention_heads", required=False)
    head_size = _int(cfg, cfg_path, "head_dim", "head_size", required=False)
    if head_size is None:
        head_size = n_embd // n_head if n_head else 64  # fla's RWKV7Config default head_dim
    vocab = _int(cfg, cfg_path, "vocab_size")
    meta: dict[str, Any] = {
        "format": "hf", "n_layer": _int(cfg, cfg_path, "num_hidden_layers", "n_layer"), "n_embd": n_embd,
        "vocab_size": vocab, "head_size": head_size, "n_head": n_embd // head_size,
        "tokenizer": cfg.get("fsearch_tokenizer") or _tokenizer_for_vocab(vocab), "model_type": cfg.get("model_type"),
    }
    optional = {"ffn_dim": ("intermediate_size",), "d_decay": ("decay_low_rank_dim",), "d_aaa": ("a_low_rank_dim",),
                "d_mv": ("v_low_rank_dim",), "d_gate": ("gate_low_rank_dim",)}
    for field, names in optional.items():
        v = _int(cfg, cfg_path, *names, required=False)
        if v is not None:
            meta[field] = v
    shapes: dict[str, list[int]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        header = _safetensors_header(f)
        if header is None:
            raise CheckpointError(f"{f}: not a safetensors file")
        shapes.update(_tensor_shapes(header))
    meta["shapes"] = shapes
    return meta


def _fsearch_meta(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """fsearch's own checkpoint (model/checkpoint.py `save`): ModelConfig JSON in the safetensors metadata."""
    md = header.get("__metadata__") or {}
    try:
        cfg = json.loads(md["model_config"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: fsearch checkpoint without a readable model_config in its metadata") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: model_config in the metadata is not a JSON object")
    meta: dict[str, Any] = {"format": "fsearch", "format_version": md.get("format_version"),
                            "n_layer": _int(cfg, path, "n_layer"), "n_embd": _int(cfg, path, "n_embd"),
                            "vocab_size": _int(cfg, path, "vocab_size")}
    meta["head_size"] = _int(cfg, path, "head_size", required=False) or 64  # ModelConfig's default
    meta["n_head"] = meta["n_embd"] // meta["head_size"]
    for field in ("ffn_dim", "d_decay", "d_aaa", "d_mv", "d_gate", "tokenizer"):
        if cfg.get(field) is not None:
            meta[field] = cfg[field]
    meta["has_fs_gates"] = "fs_config" in md
    meta["shapes"] = _tensor_shapes(header)
    return meta


def read_checkpoint_meta(path: Path | str) -> dict[str, Any]:
    """Names, shapes and model size of a checkpoint (BlinkDL .pth, HF folder, fsearch safetensors), without torch."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint not found")
    if p.is_dir():
        if (p / "config.json").is_file():
            return _hf_meta(p)
        raise CheckpointError(f"{p}: a checkpoint folder needs config.json (Hugging Face layout)")
    if not zipfile.is_zipfile(p):
        header = _safetensors_header(p)
        if header is not None:
            if (header.get("__metadata__") or {}).get("format") == FSEARCH_FORMAT:
                return _fsearch_meta(p, header)
            shapes = _tensor_shapes(header)
            meta = blinkdl_meta({k: tuple(v) for k, v in shapes.items()}, p)  # a BlinkDL state dict as safetensors
            meta["shapes"] = shapes
            return meta
    return _pth_meta(p)


def model_config_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """The subset of a meta dict that model.config.ModelConfig accepts."""
    keys = ("vocab_size", "n_layer", "n_embd", "head_size", "ffn_dim", "d_decay", "d_aaa", "d_mv", "d_gate",
            "tokenizer")
    return {k: meta[k] for k in keys if meta.get(k) is not None}
