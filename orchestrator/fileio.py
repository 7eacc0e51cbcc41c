"""Durable file writes: every file fsearch rewrites (round-folder files, a run's result.json) goes through here.

A write is atomic and durable: the text goes to a temp file named for this process and thread (several workers of a
round, or several schedulers in one process, may write the same file at once), is flushed and fsynced, replaces the
target with `os.replace`, and the folder is fsynced so the rename itself survives a power cut.
"""
from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """fsync a folder (makes a rename or a new file in it durable); a filesystem that refuses is not an error."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def finite_json(o: Any) -> Any:
    """Non-finite floats become null (strict JSON); pydantic models become their JSON dump."""
    if hasattr(o, "model_dump"):
        o = o.model_dump(mode="json")
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_json(v) for v in o]
    return o


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(finite_json(obj), indent=1, allow_nan=False))
