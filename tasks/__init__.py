"""Task registry: synthetic generators and real-data builders. Torch-free.

`get_task(kind, params, tokenizer, data_seed)` builds a task; `task_names()` lists the registry.
"""
from __future__ import annotations

import importlib

from tasks.base import REGISTRY, DataUnavailable, Example, Task, TaskError

# modules that register tasks on import (kept lazy so `import tasks` stays cheap)
_MODULES = ("tasks.synthetic", "tasks.real")


def _load_all() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def task_names() -> list[str]:
    _load_all()
    return sorted(REGISTRY)


def task_class(kind: str) -> type[Task]:
    _load_all()
    if kind not in REGISTRY:
        raise TaskError(f"unknown task {kind!r}; known tasks: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[kind]


def get_task(kind: str, params: dict | None, tokenizer, data_seed: int = 0) -> Task:
    return task_class(kind)(params, tokenizer, data_seed)


__all__ = ["DataUnavailable", "Example", "Task", "TaskError", "get_task", "task_class", "task_names"]
