"""Named Future-Seed candidates: the original's library as presets that expand to explicit configurations.

A candidate is what a run compares against its matched baseline: a mode plus, for `prompt_fs`, an FS
configuration. Library names state every option their name promises, so a spec's `defaults.fs` can fill in only
what a name leaves open (for example `seed_scale`); it can never switch off a `detach` or a `norm` that a name asks
for (the original's base flags could). Torch-free.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from model.fs_config import FSConfig

Mode = Literal["baseline", "prompt_fs", "read_twice"]

TRAINABLE_GATE_LR = 5e-4

_NORM_DETACH = {"variant": "scalar", "alpha_init": -2.0, "alpha_lr": 0.0, "norm": True, "detach": True, "clip": 1.0,
                "schedule": "none", "schedule_min": 1.0, "schedule_max": 1.0}

# name pattern -> FS fields (beyond layer_start, taken from lN)
LIBRARY: dict[str, dict[str, Any]] = {
    "scalar_l{N}_norm_detach": dict(_NORM_DETACH),
    "scalar_l{N}_norm_node": {**_NORM_DETACH, "detach": False},
    "scalar_l{N}_nonorm_detach": {**_NORM_DETACH, "norm": False},
    "scalar_l{N}_sched_cos": {**_NORM_DETACH, "schedule": "cosine", "schedule_min": 0.4, "schedule_max": 1.0},
    "scalar_l{N}_trainable": {**_NORM_DETACH, "alpha_lr": TRAINABLE_GATE_LR},
    "scalar_l{N}_nodetach": {**_NORM_DETACH, "alpha_lr": TRAINABLE_GATE_LR, "detach": False},
    "head_l{N}": {**_NORM_DETACH, "variant": "head", "alpha_init": -3.0, "alpha_head_init": -3.0,
                  "alpha_head_lr": TRAINABLE_GATE_LR},
    "inputgate_l{N}": {**_NORM_DETACH, "variant": "input", "alpha_init": -3.0, "in_w_lr": TRAINABLE_GATE_LR,
                       "in_b_lr": TRAINABLE_GATE_LR},
}

_PATTERNS = [(re.compile("^" + p.replace("{N}", r"(\d+)") + "$"), p) for p in LIBRARY]


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    mode: Mode
    fs: FSConfig | None = None

    @property
    def is_baseline(self) -> bool:
        return self.mode == "baseline"


BASELINE = Candidate(name="baseline", mode="baseline")


def library_names() -> list[str]:
    return ["baseline", "read_twice", *LIBRARY]


def library_fields(name: str) -> dict[str, Any] | None:
    """FS fields a library name stands for, or None if the name is not in the library."""
    for rx, pattern in _PATTERNS:
        m = rx.match(name)
        if m:
            return {**LIBRARY[pattern], "layer_start": int(m.group(1))}
    return None


def resolve(name: str, fs_defaults: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
            mode: Mode | None = None) -> Candidate:
    """Expand a candidate: library name (optionally with explicit FS overrides) or an explicit FS configuration.

    Precedence: spec defaults < library name < explicit overrides. `baseline` and `read_twice` take no FS options.
    Raises ValueError naming the candidate on anything unknown or invalid.
    """
    if name in ("baseline", "read_twice") or mode in ("baseline", "read_twice"):
        if overrides:
            raise ValueError(f"candidate {name!r}: mode {mode or name!r} takes no fs options")
        return Candidate(name=name, mode=mode or name)  # type: ignore[arg-type]
    fields = library_fields(name)
    if fields is None and not overrides:
        raise ValueError(
            f"unknown candidate {name!r}: not a library name ({', '.join(library_names())}) and no explicit fs given"
        )
    merged = {**(fs_defaults or {}), **(fields or {}), **(overrides or {})}
    # options that belong to another variant come only from defaults; drop them rather than fail on a default
    variant = merged.get("variant", "scalar")
    if variant != "head":
        for k in ("alpha_head_init", "alpha_head_lr"):
            if k not in (overrides or {}) and k not in (fields or {}):
                merged.pop(k, None)
    if variant != "input":
        for k in ("in_w_lr", "in_b_lr"):
            if k not in (overrides or {}) and k not in (fields or {}):
                merged.pop(k, None)
    try:
        fs = FSConfig(**merged)
    except ValidationError as e:
        raise ValueError(f"candidate {name!r}: {_fs_errors(e)}") from None
    return Candidate(name=name, mode="prompt_fs", fs=fs)


def _fs_errors(e: ValidationError) -> str:
    """FSConfig's validation errors on one line, each field named as the spec writes it (`fs.alpha_init: ...`)."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = err.get("msg", "").removeprefix("Value error, ")
        parts.append(f"fs.{loc}: {msg}" if loc else msg)
    return " ".join("; ".join(parts).split())
