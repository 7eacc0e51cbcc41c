"""The worker's expected failures."""
from __future__ import annotations


class RunError(Exception):
    """An expected failure with a kind (config, data, oom) and a one-line message."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
