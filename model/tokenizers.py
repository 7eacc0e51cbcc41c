"""Tokenizers behind one interface. Torch-free, so tasks and the control plane can use them.

- `world`: the RWKV World tokenizer (65536 ids, id 0 = end of text). Its vocabulary file is read from inside the
  `rwkv` PyPI package; it is never copied into this repository.
- `byte`: one token per byte (id = byte + 1, id 0 = end of text) for small from-scratch models.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Protocol

EOT_ID = 0


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    name = "byte"
    vocab_size = 257
    eot_id = EOT_ID

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 1 for i in ids if 0 < i <= 256).decode("utf-8", errors="replace")


class TokenizerUnavailable(RuntimeError):
    """A tokenizer that cannot be built on this machine (its package or vocabulary file is missing)."""


def world_vocab_path() -> Path:
    spec = importlib.util.find_spec("rwkv")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerUnavailable("the RWKV World tokenizer needs the `rwkv` package (pip install rwkv==0.8.32)")
    path = Path(list(spec.submodule_search_locations)[0]) / "rwkv_vocab_v20230424.txt"
    if not path.exists():
        raise TokenizerUnavailable(f"the rwkv package has no World vocabulary at {path}")
    return path


class WorldTokenizer:
    """Greedy longest-match over the World vocabulary's byte strings (the official algorithm)."""

    name = "world"
    vocab_size = 65536
    eot_id = EOT_ID

    def __init__(self, vocab_file: Path | None = None):
        self.idx2token: dict[int, bytes] = {}
        for line in Path(vocab_file or world_vocab_path()).read_text(encoding="utf-8").splitlines():
            idx = int(line[: line.index(" ")])
            literal = line[line.index(" ") : line.rindex(" ")]
            token = eval(literal)  # the vocabulary stores Python str/bytes literals
            token = token.encode("utf-8") if isinstance(token, str) else token
            assert len(token) == int(line[line.rindex(" ") :]), f"bad vocabulary line {idx}"
            self.idx2token[idx] = token
        self.token2idx = {v: k for k, v in self.idx2token.items()}
        # trie as nested dicts keyed by byte; a node's None entry holds the id of the token ending there
        self._trie: dict = {}
        for tok, idx in self.token2idx.items():
            node = self._trie
            for byte in tok:
                node = node.setdefault(byte, {})
            node[None] = idx

    def encode(self, text: str) -> list[int]:
        src = text.encode("utf-8")
        out, i, n = [], 0, len(src)
        while i < n:
            node, j, best, best_end = self._trie, i, None, i
            while j < n and src[j] in node:
                node = node[src[j]]
                j += 1
                if None in node:
                    best, best_end = node[None], j
            if best is None:
                raise ValueError(f"byte {src[i]!r} at offset {i} has no token in the World vocabulary")
            out.append(best)
            i = best_end
        return out

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.idx2token.get(i, b"") for i in ids).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str) -> Tokenizer:
    if name == "byte":
        return ByteTokenizer()
    if name == "world":
        return WorldTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; known: byte, world")
