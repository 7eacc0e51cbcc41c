"""Decision rules shared by the planner, the report and the simulator."""
from __future__ import annotations

LOWER_IS_BETTER = ("loss",)  # metrics (without their val_/test_ prefix) where a smaller value is better


def lower_is_better(metric: str) -> bool:
    for prefix in ("val_", "test_"):
        if metric.startswith(prefix):
            metric = metric[len(prefix):]
            break
    return metric in LOWER_IS_BETTER
