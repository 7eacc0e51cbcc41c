"""Shared machinery of the real-data tasks: where rows come from, how the three sets are split, how prompts are
fitted to a token budget, and the token cache. Torch-free; `datasets` is imported only when rows are loaded.

Data sources (`params.dataset`):
- a Hugging Face Hub id (e.g. `mbpp`, `hotpot_qa`), loaded with `datasets.load_dataset(id, dataset_config,
  split=...)`. Offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) is honoured: the dataset must then be in the
  datasets cache (HF_DATASETS_CACHE, default $HF_HOME/datasets);
- a local path, which takes precedence when it exists:
  * one JSONL/JSON/parquet file, or a folder saved with `Dataset.save_to_disk`: a single split;
  * a folder holding `{split}.jsonl|json|parquet` or `{split}-*.parquet|jsonl` files (also under `data/` or
    `{dataset_config}/`), as the hub's parquet exports are laid out;
  * a folder saved with `DatasetDict.save_to_disk`: its splits.

The three sets (roles train / val / test) read the splits named by `train_split`, `val_split`, `test_split`
(`test_split: null` = the val split). Roles that read the *same rows* (the same split, or a single-split source)
are separated by a stable hash of each row's key (`int(md5(key)[:8], 16) % 10`, the original protein rule):
  train+val+test: train 0-7, val 8, test 9      train+val: train 0-7, val 8-9
  train+test:     train 0-7, test 8-9           val+test:  val 0-4, test 5-9
so the sets never share a row. Within a role, rows are visited in an order shuffled by (task, data_seed, role)
and the first n rows that make a valid example are taken: a set of n is a prefix of a set of m > n.

Prompts: `prompt = context + trigger`. The trigger (the answer cue) and the question are never truncated: only
context material (notes, paragraphs) is cut or filled to the budget, and an example whose question alone does
not fit is dropped (and counted in the error if too few remain).

Token cache: built example sets are stored as gzipped JSON under $FSEARCH_TASK_CACHE (default
~/.cache/fsearch/tasks; `off` disables it), keyed by the task name, its template version, this module's version,
all parameters, the data seed, the tokenizer, the role, the set size and a fingerprint of the data source (local
files: size and mtime; hub: the cached builds' version/hash folders), so a change to any of them rebuilds.
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, NamedTuple

from pydantic import Field, model_validator

from tasks.base import DataUnavailable, Example, Task, TaskError, TaskParams

COMMON_VERSION = 1  # bump when anything here changes how examples are built
CACHE_ENV = "FSEARCH_TASK_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/fsearch/tasks"
HUB_PROBE_TIMEOUT_S = 10.0
ROLES = ("train", "val", "test")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_TRUE = {"1", "ON", "YES", "TRUE"}

# roles sharing one source split -> {role: buckets of md5(key) % 10}
HASH_BUCKETS: dict[frozenset[str], dict[str, range]] = {
    frozenset({"train", "val", "test"}): {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)},
    frozenset({"train", "val"}): {"train": range(0, 8), "val": range(8, 10)},
    frozenset({"train", "test"}): {"train": range(0, 8), "test": range(8, 10)},
    frozenset({"val", "test"}): {"val": range(0, 5), "test": range(5, 10)},
}


def hash_bucket(key: str) -> int:
    return int(hashlib.md5(key.encode("utf-8")).hexdigest()[:8], 16) % 10


# ---------------------------------------------------------------------------------------------------------------
# environment


def hf_offline() -> bool:
    """Offline as the `datasets` library decides it: HF_DATASETS_OFFLINE if set, else HF_HUB_OFFLINE."""
    flag = os.environ.get("HF_DATASETS_OFFLINE")
    if flag is None:
        flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in _TRUE


def datasets_cache_dir() -> Path:
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "datasets"


def token_cache_dir() -> Path | None:
    value = os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)
    return None if value.strip().lower() == "off" else Path(value).expanduser()


def _snake(name: str) -> str:
    # the `datasets` cache folder name of a dataset (its camelcase_to_snakecase)
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


def hub_cache_builds(dataset: str, config: str | None) -> list[Path]:
    """Prepared builds of a hub dataset in the datasets cache (what offline `load_dataset` can use)."""
    parts = dataset.split("/")
    parts[-1] = _snake(parts[-1])
    root = datasets_cache_dir() / "___".join(parts)
    builds = [Path(p) for p in glob.glob(str(root / (config or "*") / "*" / "*"))
              if not p.endswith(".incomplete") and os.path.isfile(os.path.join(p, "dataset_info.json"))]
    return sorted(builds, key=lambda p: (p.stat().st_mtime, str(p)))  # the newest last, as `datasets` picks it


# ---------------------------------------------------------------------------------------------------------------
# where one role's rows come from


@dataclass(frozen=True)
class SplitRef:
    """One split of one data source."""

    dataset: str  # as given in the params
    config: str | None
    split: str
    kind: Literal["hub", "files", "saved"]
    paths: tuple[str, ...] = ()  # data files (files) or the saved folder (saved)
    saved_split: str | None = None  # the split inside a saved DatasetDict; None for a saved single Dataset
    single: bool = False  # the source has one split only (all roles read the same rows)

    @property
    def rows_id(self) -> tuple:
        """Two refs with the same rows_id read the same rows."""
        if self.kind == "hub":
            return ("hub", self.dataset, self.config, self.split)
        return (self.kind, self.paths, self.saved_split)

    def describe(self) -> str:
        cfg = f" (config {self.config!r})" if self.config else ""
        if self.single:
            return f"dataset {self.dataset!r}"
        return f"dataset {self.dataset!r}{cfg} split {self.split!r}"


def is_local(dataset: str) -> bool:
    p = os.path.expanduser(dataset)
    return (os.path.exists(p) or dataset.startswith(("/", "./", "../", "~")) or dataset.endswith(DATA_SUFFIXES))


def _split_files(folder: Path, split: str, config: str | None) -> list[str]:
    for base in ([folder / config] if config else []) + [folder / "data", folder]:
        if not base.is_dir():
            continue
        for suffix in DATA_SUFFIXES:
            exact = base / f"{split}{suffix}"
            if exact.is_file():
                return [str(exact)]
            shards = sorted(glob.glob(str(base / f"{split}-*{suffix}")))
            if shards:
                return shards
    return []


def resolve_split(dataset: str, config: str | None, split: str) -> SplitRef:
    """Find a split without loading it. Raises DataUnavailable for a missing local path or split."""
    if not is_local(dataset):
        return SplitRef(dataset, config, split, "hub")
    path = Path(os.path.expanduser(dataset)).resolve()
    if not path.exists():
        raise DataUnavailable(f"dataset path '{dataset}' does not exist")
    if path.is_file():
        if not path.name.endswith(DATA_SUFFIXES):
            raise DataUnavailable(f"dataset file '{dataset}' is not JSONL, JSON or parquet")
        return SplitRef(dataset, config, split, "files", (str(path),), single=True)
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise DataUnavailable(f"saved dataset '{dataset}' has no split {split!r} (splits: {', '.join(splits)})")
        return SplitRef(dataset, config, split, "saved", (str(path),), saved_split=split)
    if (path / "state.json").is_file():
        return SplitRef(dataset, config, split, "saved", (str(path),), single=True)
    files = _split_files(path, split, config)
    if not files:
        raise DataUnavailable(f"dataset folder '{dataset}' has no data for split {split!r} (expected {split}.jsonl, "
                              f"{split}.parquet or {split}-*.parquet)")
    return SplitRef(dataset, config, split, "files", tuple(files))


def _probe_hub(dataset: str) -> None:
    """Online and not cached: ask the Hub whether the dataset exists (metadata only)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        api.dataset_info(dataset, timeout=HUB_PROBE_TIMEOUT_S)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise DataUnavailable(f"dataset {dataset!r} cannot be accessed on the Hugging Face Hub ({type(e).__name__}); "
                              "set params.dataset to a local JSONL/parquet/saved-dataset path") from None
    except Exception as e:  # connection errors of any client library
        raise DataUnavailable(f"dataset {dataset!r} is not in the local cache ({datasets_cache_dir()}) and the "
                              f"Hugging Face Hub cannot be reached ({type(e).__name__}); set params.dataset to a "
                              "local JSONL/parquet/saved-dataset path") from None


def check_split(ref: SplitRef) -> None:
    """Cheap availability check of one split (no rows are loaded). Raises DataUnavailable."""
    if ref.kind != "hub":
        return  # resolve_split already found the files
    builds = hub_cache_builds(ref.dataset, ref.config)
    if builds:
        splits = _cached_splits(builds[-1])
        if splits is not None and ref.split not in splits:
            raise DataUnavailable(f"{ref.describe()} does not exist (cached splits: {', '.join(sorted(splits))})")
        return
    cfg = f" (config {ref.config!r})" if ref.config else ""
    if hf_offline():
        raise DataUnavailable(f"dataset {ref.dataset!r}{cfg} is not available offline (set params.dataset to a "
                              "local JSONL/parquet/saved-dataset path, or unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
                              "to download it)")
    _probe_hub(ref.dataset)


def _cached_splits(build: Path) -> dict[str, int] | None:
    try:
        info = json.loads((build / "dataset_info.json").read_text())
    except (OSError, ValueError):
        return None
    splits = info.get("splits") or {}
    return {name: int(s.get("num_examples", 0)) for name, s in splits.items()}


def split_row_count(ref: SplitRef) -> int | None:
    """Number of rows of a split where it is known without loading it (hub cache info, parquet metadata, JSONL
    line count); None otherwise."""
    if ref.kind == "hub":
        builds = hub_cache_builds(ref.dataset, ref.config)
        splits = _cached_splits(builds[-1]) if builds else None
        return None if splits is None else splits.get(ref.split)
    if ref.kind == "files":
        total = 0
        for f in ref.paths:
            if f.endswith(".parquet"):
                import pyarrow.parquet as pq

                total += pq.ParquetFile(f).metadata.num_rows
            elif f.endswith(".jsonl"):
                with open(f, "rb") as fh:
                    total += sum(1 for line in fh if line.strip())
            else:
                return None
        return total
    return None


def fingerprint(ref: SplitRef) -> str:
    """Changes when the source's content may have changed (for the token cache key)."""
    if ref.kind == "hub":
        return "|".join(str(p) for p in hub_cache_builds(ref.dataset, ref.config))
    items = []
    for p in ref.paths:
        paths = [Path(p)] if Path(p).is_file() else sorted(x for x in Path(p).rglob("*") if x.is_file())
        for x in paths:
            st = x.stat()
            items.append(f"{x}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


_LOADED: dict[tuple, Any] = {}


@contextlib.contextmanager
def _offline_libraries(offline: bool):
    """`datasets` and `huggingface_hub` read the offline variables once, at import: when the environment says offline
    now, make both libraries offline for this load too (never the reverse)."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def load_split(ref: SplitRef):
    """The split's rows as a `datasets.Dataset` (memoised per process and source fingerprint)."""
    memo_key = (ref.rows_id, fingerprint(ref))
    if memo_key in _LOADED:
        return _LOADED[memo_key]
    if ref.kind == "hub":
        check_split(ref)
    import datasets

    cache_dir = str(datasets_cache_dir())
    try:
        if ref.kind == "saved":
            ds = datasets.load_from_disk(ref.paths[0])
            if ref.saved_split is not None:
                ds = ds[ref.saved_split]
            elif isinstance(ds, datasets.DatasetDict):
                raise DataUnavailable(f"saved dataset '{ref.dataset}' holds several splits")
        elif ref.kind == "files":
            builder = "parquet" if ref.paths[0].endswith(".parquet") else "json"
            ds = datasets.load_dataset(builder, data_files=list(ref.paths), split="train", cache_dir=cache_dir)
        else:
            with _offline_libraries(hf_offline()):
                ds = datasets.load_dataset(ref.dataset, ref.config, split=ref.split, cache_dir=cache_dir)
    except DataUnavailable:
        raise
    except Exception as e:
        msg = (str(e).strip().splitlines() or [""])[0][:300]
        raise DataUnavailable(f"{ref.describe()} could not be loaded ({type(e).__name__}: {msg})") from None
    _LOADED[memo_key] = ds
    return ds


# ---------------------------------------------------------------------------------------------------------------
# prompt fitting


def clean_decode(tok, ids) -> str:
    """Decode ids cut at an arbitrary token; drops a partial UTF-8 character at either end."""
    return tok.decode(list(ids)).strip("\ufffd")


class Fitted(NamedTuple):
    """A context fitted to the token budget, with its token ids (= tok.encode(text))."""

    text: str
    ids: list[int]
    was_cut: bool = False


def fill_notes(tok, head: str, tail: str, trigger_len: int, notes: Iterator[str], max_tokens: int,
               max_notes: int, encode_note: Callable[[str], list[int]] | None = None) -> Fitted | None:
    """`head + notes + tail`, with notes appended while context + trigger fits in `max_tokens` tokens; the last note
    is cut to the remaining budget. None when `head + tail + trigger` alone does not fit. `encode_note` may memoise
    the notes' encodings (they recur across examples)."""
    encode_note = encode_note or tok.encode
    budget = max_tokens - trigger_len - len(tok.encode(head + tail))
    if budget < 0:
        return None
    pieces, used = [], 0
    for _ in range(max_notes):
        piece = next(notes, None)
        if piece is None:
            break
        ids = encode_note(piece)
        if used + len(ids) <= budget:
            pieces.append(piece)
            used += len(ids)
            continue
        if budget - used > 0:
            pieces.append(clean_decode(tok, ids[: budget - used]))
        break
    body = "".join(pieces)
    # tokens can merge differently across the joins; trim the notes until the whole context fits
    ids = tok.encode(head + body + tail)
    while body and len(ids) + trigger_len > max_tokens:
        body = body[: max(0, len(body) - max(1, len(ids) + trigger_len - max_tokens))]
        ids = tok.encode(head + body + tail)
    return Fitted(head + body + tail, ids)


def cut_context_start(tok, head: str, material: str, tail: str, trigger_len: int, max_tokens: int) -> Fitted | None:
    """`head + material + tail` fitted to `max_tokens` (with the trigger) by dropping the *start* of `material`
    (the part farthest from the answer), then a partial leading word. None when `head + tail + trigger` alone does
    not fit."""
    text = head + material + tail
    ids = tok.encode(text)
    if len(ids) + trigger_len <= max_tokens:
        return Fitted(text, ids, False)
    budget = max_tokens - trigger_len - len(tok.encode(head + tail))
    if budget <= 0:
        return None
    m_ids = tok.encode(material)
    kept = clean_decode(tok, m_ids[len(m_ids) - budget:])
    start = len(material) - len(kept)
    if material.endswith(kept) and (start == 0 or material[start - 1].isspace()):
        kept = kept.lstrip()  # the cut fell on a word boundary
    else:
        kept = _drop_partial_word(kept)
    ids = tok.encode(head + kept + tail)
    while kept and len(ids) + trigger_len > max_tokens:
        kept = _drop_partial_word(kept[max(1, len(ids) + trigger_len - max_tokens):])
        ids = tok.encode(head + kept + tail)
    return Fitted(head + kept + tail, ids, True)


class MemoEncoder:
    """tok.encode with a memo for texts that recur (notes); cleared when it grows past `limit` entries."""

    def __init__(self, tok, limit: int = 100_000):
        self.tok, self.limit, self.memo = tok, limit, {}

    def __call__(self, text: str) -> list[int]:
        ids = self.memo.get(text)
        if ids is None:
            if len(self.memo) >= self.limit:
                self.memo.clear()
            ids = self.memo[text] = self.tok.encode(text)
        return ids


def _drop_partial_word(text: str) -> str:
    if text and not text[0].isspace():
        cut = re.search(r"\s", text)
        text = text[cut.start():] if cut else ""
    return text.lstrip()


# ---------------------------------------------------------------------------------------------------------------
# parameters and the shared task machinery


class RealParams(TaskParams):
    """Parameters every real-data task has (each task sets its own defaults and adds its own)."""

    dataset: str
    dataset_config: str | None = None
    train_split: str = "train"
    val_split: str = "validation"
    test_split: str | None = "test"  # None: the test set comes from the val split (hash-separated)
    n_train: int = Field(1000, ge=1)
    n_val: int = Field(200, ge=1)  # evaluation set sizes the spec asks for (eval_set builds at least this many)
    n_test: int = Field(200, ge=1)
    max_prompt_tokens: int = Field(2048, ge=16)
    min_prompt_tokens: int = Field(0, ge=0)
    max_answer_tokens: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _check_lengths(self):
        if self.min_prompt_tokens > self.max_prompt_tokens:
            raise ValueError(f"min_prompt_tokens ({self.min_prompt_tokens}) exceeds max_prompt_tokens "
                             f"({self.max_prompt_tokens})")
        return self


class Rows:
    """The rows of one role, in the role's fixed order."""

    def __init__(self, ds, indices: list[int]):
        self.ds = ds
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        for i in self.indices:
            yield i, self.ds[i]


class RealTask(Task):
    """A task built from a dataset: subclasses define `_examples(role, rows)` and `score()`."""

    Params: ClassVar[type[RealParams]] = RealParams
    TEMPLATE_VERSION: ClassVar[int] = 1  # bump when a prompt layout or example rule of the task changes
    key_columns: ClassVar[tuple[str, ...] | None] = None  # columns row_key() reads (to load only those)

    params: RealParams

    def __init__(self, params, tokenizer, data_seed: int = 0):
        super().__init__(params, tokenizer, data_seed)
        self._pools: dict[str, list[Example]] = {}
        self._buckets: dict[tuple, list[int]] = {}
        self.encode_note = MemoEncoder(tokenizer)

    # ---- what a subclass provides
    def row_key(self, row: dict) -> str:
        """A stable identity of a row (the hash split uses it)."""
        raise NotImplementedError

    def _examples(self, role: str, rows: Rows) -> Iterator[Example | str]:
        """Examples in the role's order; a string instead of an example is the reason a row was dropped."""
        raise NotImplementedError

    # ---- data
    def split_ref(self, role: str) -> SplitRef:
        p = self.params
        split = {"train": p.train_split, "val": p.val_split, "test": p.test_split or p.val_split}[role]
        try:
            return resolve_split(p.dataset, p.dataset_config, split)
        except DataUnavailable as e:
            raise DataUnavailable(f"{self.name}: {e}") from None

    def _sharing(self, role: str) -> frozenset[str]:
        rows_id = self.split_ref(role).rows_id
        return frozenset(r for r in ROLES if self.split_ref(r).rows_id == rows_id)

    def check_available(self) -> None:
        """Offline-aware and cheap: the data of every role is there, and the requested counts fit the known split
        sizes (the exact usable count is known only once examples are built)."""
        seen = set()
        for role in ROLES:
            ref = self.split_ref(role)
            if ref.rows_id not in seen:
                seen.add(ref.rows_id)
                try:
                    check_split(ref)
                except DataUnavailable as e:
                    raise DataUnavailable(f"{self.name}: {e}") from None
            if len(self._sharing(role)) == 1:
                rows = split_row_count(ref)
                want = self._requested(role)
                if rows is not None and want > rows:
                    raise TaskError(f"{self.name}: {ref.describe()} has {rows} examples; "
                                    f"{self._count_name(role)}={want} requested")

    def _requested(self, role: str, n: int = 0) -> int:
        return max(n, {"train": self.params.n_train, "val": self.params.n_val, "test": self.params.n_test}[role])

    @staticmethod
    def _count_name(role: str) -> str:
        return {"train": "n_train", "val": "n_val", "test": "n_test"}[role]

    def rng(self, *tags) -> random.Random:
        return random.Random("|".join(str(t) for t in (self.name, self.data_seed, *tags)))

    def role_rows(self, role: str) -> Rows:
        """The rows of a role in the role's fixed order (hash-separated from the roles that read the same rows)."""
        ref = self.split_ref(role)
        try:
            ds = load_split(ref)
        except DataUnavailable as e:
            raise DataUnavailable(f"{self.name}: {e}") from None
        sharing = self._sharing(role)
        if len(sharing) == 1:
            indices = list(range(len(ds)))
        else:
            buckets = HASH_BUCKETS[sharing][role]
            indices = [i for i, b in enumerate(self._row_buckets(ref, ds)) if b in buckets]
        self.rng(role, "order").shuffle(indices)
        return Rows(ds, indices)

    def _row_buckets(self, ref: SplitRef, ds) -> list[int]:
        """hash_bucket(row_key(row)) of every row, read column-wise (once per source for all roles)."""
        memo = (ref.rows_id, fingerprint(ref))
        if memo not in self._buckets:
            cols = list(self.key_columns) if self.key_columns and set(self.key_columns) <= set(ds.column_names) \
                else ds.column_names
            table = ds.select_columns(cols).to_dict()
            try:
                self._buckets[memo] = [hash_bucket(self.row_key(dict(zip(cols, values))))
                                       for values in zip(*(table[c] for c in cols))]
            except KeyError as e:
                raise DataUnavailable(f"{self.name}: {ref.describe()} has no field {e} (needed to separate the sets "
                                      "that share its rows)") from None
        return self._buckets[memo]

    # ---- building with the cache
    def _cache_file(self, role: str, n: int) -> Path | None:
        root = token_cache_dir()
        if root is None:
            return None
        key = {"task": self.name, "template": self.TEMPLATE_VERSION, "common": COMMON_VERSION,
               "params": self.params.model_dump(mode="json"), "data_seed": self.data_seed,
               "tokenizer": [self.tok.name, self.tok.vocab_size], "role": role, "n": n,
               "source": fingerprint(self.split_ref(role))}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return root / f"{self.name}_{role}_{n}_{digest}.json.gz"

    def _pool(self, role: str, n: int) -> list[Example]:
        have = self._pools.get(role)
        if have is not None and len(have) >= n:
            return have
        path = self._cache_file(role, n)
        if path is not None and path.is_file():
            pool = _read_examples(path)
        else:
            pool = self._build(role, n)
            path = self._cache_file(role, n)  # the source fingerprint may have changed by loading (hub download)
            if path is not None:
                _write_examples(path, pool)
        self._pools[role] = pool
        return pool

    def _build(self, role: str, n: int) -> list[Example]:
        rows = self.role_rows(role)
        built: list[Example] = []
        drops: Counter[str] = Counter()
        for item in self._examples(role, rows):
            if isinstance(item, str):
                drops[item] += 1
                continue
            built.append(item)
            if len(built) == n:
                return built
        ref = self.split_ref(role)
        part = "" if len(self._sharing(role)) == 1 else f" ({role} part of a hash split)"
        why = "; ".join(f"{k} dropped: {reason}" for reason, k in drops.most_common())
        raise TaskError(f"{self.name}: {ref.describe()}{part} gives {len(built)} usable examples from {len(rows)} rows"
                        f"{' (' + why + ')' if why else ''}; {self._count_name(role)}={n} requested")

    # ---- the Task interface
    def train_examples(self, seed: int) -> Iterator[Example]:
        """Endless draws with replacement from the fixed training pool, in an order given by `seed`. The pool is built
        (or read from the cache) here, so data errors surface on this call, not on the first draw."""
        return _draws(self._pool("train", self.params.n_train), random.Random(seed))

    def eval_set(self, split, n: int) -> list[Example]:
        if split not in ("val", "test"):
            raise TaskError(f"{self.name}: eval_set split must be 'val' or 'test', got {split!r}")
        if n < 1:
            raise TaskError(f"{self.name}: eval_set needs n >= 1, got {n}")
        return self._pool(split, self._requested(split, n))[:n]

    def max_lengths(self) -> tuple[int, int]:
        """Bounds from the parameters (no data needed): read_twice doubles the context, never the trigger."""
        return 2 * self.params.max_prompt_tokens, self.params.max_answer_tokens

    # ---- helpers for subclasses
    def example(self, context: str | Fitted, trigger: str, answer: str, **meta: Any) -> Example | str:
        """An Example with the answer cut to max_answer_tokens; a drop reason if the prompt is outside
        [min_prompt_tokens, max_prompt_tokens]."""
        p = self.params
        if isinstance(context, Fitted):
            context, c_ids = context.text, context.ids
        else:
            c_ids = self.tok.encode(context)
        t_ids = self.tok.encode(trigger)
        n_prompt = len(c_ids) + len(t_ids)
        if n_prompt > p.max_prompt_tokens:
            return "prompt over max_prompt_tokens"
        if n_prompt < p.min_prompt_tokens:
            return "prompt under min_prompt_tokens"
        a_ids = self.tok.encode(answer)
        if len(a_ids) > p.max_answer_tokens:
            answer = clean_decode(self.tok, a_ids[: p.max_answer_tokens])
            a_ids = self.tok.encode(answer)
            while len(a_ids) > p.max_answer_tokens:
                answer = answer[:-1]
                a_ids = self.tok.encode(answer)
            meta["answer_truncated"] = True
        return Example(context, trigger, answer, tuple(c_ids), tuple(t_ids), tuple(a_ids), meta)

    def trigger_len(self, trigger: str) -> int:
        return len(self.tok.encode(trigger))


def _draws(pool: list[Example], rng: random.Random) -> Iterator[Example]:
    while True:
        yield pool[rng.randrange(len(pool))]


def _write_examples(path: Path, pool: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = [{"context": e.context, "trigger": e.trigger, "answer": e.answer, "context_ids": list(e.context_ids),
             "trigger_ids": list(e.trigger_ids), "answer_ids": list(e.answer_ids), "meta": e.meta} for e in pool]
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    # json.dumps (the C encoder) then one fast compression: json.dump into a gzip stream is ~20x slower
    tmp.write_bytes(gzip.compress(json.dumps(data).encode("utf-8"), compresslevel=1))
    os.replace(tmp, path)


def _read_examples(path: Path) -> list[Example]:
    data = json.loads(gzip.decompress(path.read_bytes()))
    return [Example(d["context"], d["trigger"], d["answer"], tuple(d["context_ids"]), tuple(d["trigger_ids"]),
                    tuple(d["answer_ids"]), d["meta"]) for d in data]


# ---------------------------------------------------------------------------------------------------------------
# small text utilities shared by several tasks


def first_line(text: str) -> str:
    """A generated answer up to its first line break (answers are single-line), stripped."""
    return text.strip("\n").split("\n", 1)[0].strip()


def note_stream(rng: random.Random, pool: list[str], exclude: str | None = None) -> Iterator[str]:
    """Random notes from the pool, with replacement, never `exclude`."""
    choices = [n for n in pool if n != exclude] if exclude is not None else pool
    while choices:
        yield choices[rng.randrange(len(choices))]
