"""Sudoku completion: a solved board with some cells masked; the answer is the whole board."""
from __future__ import annotations

import functools
import random
from typing import Literal

from pydantic import ValidationInfo, field_validator

from tasks.base import Example, register
from tasks.synthetic.common import Problem, SyntheticParams, SyntheticTask, char_accuracy, fixed_width

SYMBOLS = "123456789ABCDEFG"  # cell values; a side-s board uses the first s
HOLE = "0"  # how a masked cell is shown in the puzzle


class SudokuParams(SyntheticParams):
    layout: Literal["puzzle"] = "puzzle"
    base: Literal[2, 3] = 2  # box side; the board is base² x base² (4x4 or 9x9)
    mask_count: int | None = None  # masked cells; None = half the cells (8 of 16, 40 of 81)
    mask_region: Literal["prefix", "suffix", "random"] = "random"  # first k cells, last k cells (row-major), or any k

    @field_validator("mask_count")
    @classmethod
    def _mask_count_fits(cls, v: int | None, info: ValidationInfo) -> int | None:
        cells = info.data.get("base", 2) ** 4
        if v is not None and not 1 <= v <= cells - 1:
            raise ValueError(f"must be between 1 and {cells - 1} for a {cells}-cell board, got {v}")
        return v


@functools.lru_cache(maxsize=None)
def units(base: int) -> tuple[tuple[int, ...], ...]:
    """Cell indices (row-major) of every row, column and box of a base² x base² board."""
    side = base * base
    rows = [tuple(r * side + c for c in range(side)) for r in range(side)]
    cols = [tuple(r * side + c for r in range(side)) for c in range(side)]
    boxes = [tuple((br * base + r) * side + bc * base + c for r in range(base) for c in range(base))
             for br in range(base) for bc in range(base)]
    return tuple(rows + cols + boxes)


def solved_board(rng: random.Random, base: int) -> str:
    """A valid board: the pattern (base·(r mod base) + r div base + c) mod side, with rows shuffled within
    shuffled bands, columns within shuffled stacks, and the symbols permuted."""
    side = base * base

    def shuffled(seq: range) -> list[int]:
        out = list(seq)
        rng.shuffle(out)
        return out

    rows = [band * base + r for band in shuffled(range(base)) for r in shuffled(range(base))]
    cols = [stack * base + c for stack in shuffled(range(base)) for c in shuffled(range(base))]
    symbols = shuffled(range(side))
    return "".join(SYMBOLS[symbols[(base * (r % base) + r // base + c) % side]] for r in rows for c in cols)


def is_solution(board: str, puzzle: str, base: int) -> bool:
    """`board` is a complete valid board that keeps every given (non-hole) cell of `puzzle`."""
    side = base * base
    symbols = set(SYMBOLS[:side])
    if len(board) != side * side or len(puzzle) != side * side:
        return False
    if any(p != HOLE and p != b for p, b in zip(puzzle, board)):
        return False
    return all({board[i] for i in unit} == symbols for unit in units(base))


@register
class SudokuTask(SyntheticTask):
    """Context `SUDOKU{side}|P={puzzle}|`, trigger `A=`, answer the full solved board (row-major, holes shown as 0).

    Metrics (per example, averaged by the worker):
    - `cell_acc`: share of all cells equal to the generator's board;
    - `hole_acc`: share of the masked cells equal to the generator's board;
    - `solve_rate`: 1 if the prediction is a valid complete board that keeps the givens, whichever solution it is;
    - `exact`: 1 if the prediction equals the generator's board.
    A puzzle may have several solutions (nothing here forces uniqueness), so a prediction that `solve_rate` accepts
    gets full `cell_acc` and `hole_acc` too; otherwise those compare against the generator's board.

    Primary metric `hole_acc`: the given cells are copied from the prompt, so `cell_acc` is inflated by the
    (n−k)/n free cells and moves little when reasoning improves; `solve_rate` and `exact` stay at 0 until every hole
    is right, too coarse for short screens. `hole_acc` measures the cells that need reasoning, in small steps.
    """

    name = "sudoku"
    Params = SudokuParams
    primary_metric = "hole_acc"
    unit_metrics = ("cell_acc", "hole_acc", "solve_rate", "exact")
    description = "sudoku completion (4x4 or 9x9), answer = full board"
    metric_definitions = {
        "cell_acc": "share of all cells equal to the generator's board (a valid solution counts as all right)",
        "hole_acc": "share of the masked cells equal to the generator's board (a valid solution counts as all right)",
        "solve_rate": "share of predictions that are a valid complete board keeping every given cell",
        "exact": "share of predictions equal to the generator's board",
    }

    @classmethod
    def chance_levels(cls, params: SudokuParams) -> dict[str, float]:
        """hole_acc: each hole guessed uniformly among the side symbols, 1/side. Exact when the puzzle has one
        solution; with s solutions a guess that solves the puzzle scores 1, which adds less than
        (s - 1) / side**holes."""
        return {"hole_acc": 1.0 / params.base ** 2}

    params: SudokuParams

    @property
    def side(self) -> int:
        return self.params.base ** 2

    @property
    def mask_count(self) -> int:
        return self.params.mask_count if self.params.mask_count is not None else self.side ** 2 // 2

    def holes(self, rng: random.Random) -> list[int]:
        n, k = self.side ** 2, self.mask_count
        if self.params.mask_region == "prefix":
            return list(range(k))
        if self.params.mask_region == "suffix":
            return list(range(n - k, n))
        return rng.sample(range(n), k)

    def draw(self, rng: random.Random) -> Problem:
        board = solved_board(rng, self.params.base)
        holes = set(self.holes(rng))
        puzzle = "".join(HOLE if i in holes else c for i, c in enumerate(board))
        return self.problem(puzzle, board)

    def problem(self, puzzle: str, board: str) -> Problem:
        """The problem for a given (puzzle, solution) pair; the key is the puzzle, i.e. exactly what the prompt shows."""
        return Problem(key=puzzle, context=f"SUDOKU{self.side}|P={puzzle}|", trigger="A=", answer=board,
                       meta={"puzzle": puzzle})

    def text_lengths(self) -> tuple[int, int, int]:
        cells = self.side ** 2
        return len(f"SUDOKU{self.side}|P=|") + cells, len("A="), cells

    def score(self, example: Example, predicted: str) -> dict[str, float]:
        answer, puzzle = example.answer, example.meta["puzzle"]
        board = fixed_width(predicted, len(answer))
        if is_solution(board, puzzle, self.params.base):
            return {"cell_acc": 1.0, "hole_acc": 1.0, "solve_rate": 1.0, "exact": float(board == answer)}
        holes = [i for i, c in enumerate(puzzle) if c == HOLE]
        return {"cell_acc": char_accuracy(board, answer), "hole_acc": char_accuracy(board, answer, holes),
                "solve_rate": 0.0, "exact": 0.0}
