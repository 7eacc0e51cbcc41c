"""Run identity: which training a record belongs to, and which baseline a candidate run is compared with.

A RunKey names one run: (task label, stage, candidate, seed) plus every condition a comparison depends on. Its string
form is readable and filesystem-safe:

    sudoku4.quick.scalar_l2_trainable.s0-3f9a1c20be

The hex suffix hashes all the key's fields: the comparison conditions (effective batch, steps, eval_every, n_val,
data_seed), a digest of the rest of the run's setup that a candidate shares with its baseline (task kind and
parameters, model source: preset or checkpoint, any shape overrides and the init seed (a fixed one, or none where a
from-scratch init follows the run's seed: then seeds differ in init as well as data order), the task's own model
where it has one; optimiser, loss, test-set size, kernel, precision, eval batch; `compile` only when on) and a
digest of the candidate's resolved configuration (mode + FS fields). A spec change that changes a run therefore
gives it a new key: an old record is never reused for a different run, and nothing has to be refused on resume. (A
model source without shape overrides hashes as it did before overrides existed: ModelSource leaves an absent `shape`
out of its dump; a fixed init seed, and any checkpoint source, hash as they did before the init could follow the
seed.)

The matched baseline of a candidate run is the baseline run of the same task, stage, seed and conditions
(`RunKey.matched_baseline()`): never a baseline of another stage or budget. Torch-free.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from model.candidates import BASELINE, Candidate

NAME_PATTERN = r"[A-Za-z0-9_-]+"  # task labels and candidate names: no dots, they separate a key's parts
DIGEST_LEN = 10
_KEY_RX = re.compile(
    rf"^(?P<task>{NAME_PATTERN})\.(?P<stage>[a-z]+)\.(?P<candidate>{NAME_PATTERN})\.s(?P<seed>\d+)-(?P<digest>[0-9a-f]+)$"
)


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces) used for every digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def short_hash(obj: Any, n: int = DIGEST_LEN) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


def candidate_digest(candidate: Candidate) -> str:
    """Digest of what a candidate does (its mode and resolved FS fields), independent of its name."""
    fs = candidate.fs.model_dump(mode="json") if candidate.fs is not None else None
    return short_hash({"mode": candidate.mode, "fs": fs})


BASELINE_DIGEST = candidate_digest(BASELINE)


@dataclass(frozen=True)
class RunKey:
    task: str  # the spec's task label
    stage: str
    candidate: str
    seed: int
    batch_size: int  # effective batch
    steps: int
    eval_every: int
    n_val: int
    data_seed: int
    setup: str  # digest of the setup a candidate shares with its baseline (see module doc)
    config: str  # candidate_digest of the resolved candidate

    @functools.cached_property
    def digest(self) -> str:
        return short_hash(dataclasses.asdict(self))

    @functools.cached_property
    def run_key(self) -> str:
        return f"{self.task}.{self.stage}.{self.candidate}.s{self.seed}-{self.digest}"

    def __str__(self) -> str:
        return self.run_key

    @property
    def is_baseline(self) -> bool:
        return self.candidate == BASELINE.name

    def matched_baseline(self) -> "RunKey":
        """The baseline run this run is compared with: same task, stage, seed and conditions."""
        return dataclasses.replace(self, candidate=BASELINE.name, config=BASELINE_DIGEST)


def parse_run_key(run_key: str) -> dict[str, Any]:
    """The readable parts of a run key string: task, stage, candidate, seed, digest. ValueError if malformed."""
    m = _KEY_RX.match(run_key)
    if not m:
        raise ValueError(f"not a run key: {run_key!r}")
    parts: dict[str, Any] = m.groupdict()
    parts["seed"] = int(parts["seed"])
    return parts
