"""Synthetic tasks: generated on the fly, fixed-format answers, val/test held out by hash (see common.py).

Importing this package registers: sudoku, kv_retrieval, kvsort (post-training branch) and rightcopy, constr,
kvsort_order (the main branch's infill tasks as prompt -> answer tasks).
"""
from tasks.synthetic import infill, retrieval, sudoku  # noqa: F401  (register on import)
from tasks.synthetic.common import SyntheticParams, SyntheticTask, split_of

__all__ = ["SyntheticParams", "SyntheticTask", "split_of"]
