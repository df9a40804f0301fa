"""Sudoku data: a generator with unique solutions, augmentations, the Sudoku-Extreme CSV loader,
and a seeded, checkpointable batch stream.

Grids are flat uint8 arrays of 81 cells in row-major order, 0 for a blank and 1..9 for digits.
The model sees the reference's encoding (`encode`): token = cell + 1, so PAD = 0, blank = 1,
digits 2..10, vocabulary 11.

Generated puzzles are NOT the Sudoku-Extreme distribution: `generate` removes clues from a
random solution in random order while the solution stays unique, down to `clues` givens (or as
far as uniqueness allows), so difficulty is controlled by the clue count, whereas Sudoku-Extreme
collects hard puzzles (about 22-25 givens) rated by a backtracking solver.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["count_solutions", "solve", "random_solution", "make_puzzle", "generate",
           "is_valid_solution", "is_valid_puzzle", "augment", "load_sudoku_csv",
           "write_sudoku_csv", "SudokuFormatError", "SudokuSet", "PuzzleStream", "encode"]

_ALL = 0x3FE  # bits 1..9
_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
_BITS = {1 << d: d for d in range(1, 10)}


def _masks(grid: list[int]) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """Used-digit bitmasks per row, column and box, and the blank cells; None on a clash."""
    rows, cols, boxes, blanks = [0] * 9, [0] * 9, [0] * 9, []
    for i, d in enumerate(grid):
        if d == 0:
            blanks.append(i)
            continue
        bit = 1 << d
        r, c, b = _ROW[i], _COL[i], _BOX[i]
        if (rows[r] | cols[c] | boxes[b]) & bit:
            return None
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
    return rows, cols, boxes, blanks


def _search(grid: list[int], limit: int, rng: np.random.Generator | None) -> int:
    """Count solutions up to `limit` by backtracking on the most constrained blank cell,
    filling `grid` in place with the first solution found (left filled when limit is 1)."""
    state = _masks(grid)
    if state is None:
        return 0
    rows, cols, boxes, blanks = state
    found = 0

    def rec(blanks: list[int]) -> bool:  # True: stop (limit reached)
        nonlocal found
        if not blanks:
            found += 1
            return found >= limit
        best, best_cand, best_n = -1, 0, 10
        for k, i in enumerate(blanks):  # most constrained cell first
            cand = _ALL & ~(rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]])
            n = bin(cand).count("1")
            if n < best_n:
                best, best_cand, best_n = k, cand, n
                if n <= 1:
                    break
        if best_n == 0:
            return False
        i = blanks[best]
        rest = blanks[:best] + blanks[best + 1:]
        r, c, b = _ROW[i], _COL[i], _BOX[i]
        digits = [d for d in range(1, 10) if best_cand >> d & 1]
        if rng is not None:
            rng.shuffle(digits)
        for d in digits:
            bit = 1 << d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            grid[i] = d
            stop = rec(rest)
            rows[r] &= ~bit
            cols[c] &= ~bit
            boxes[b] &= ~bit
            if stop:
                return True
            grid[i] = 0
        return False

    rec(blanks)
    return found


def count_solutions(puzzle: np.ndarray | list[int], limit: int = 2) -> int:
    """Number of solutions of `puzzle`, counted up to `limit` (2 decides uniqueness)."""
    return _search([int(v) for v in np.asarray(puzzle).reshape(81)], limit, None)


def solve(puzzle: np.ndarray | list[int]) -> np.ndarray | None:
    """One solution of `puzzle` as a uint8 (81,) array, or None when it has none."""
    grid = [int(v) for v in np.asarray(puzzle).reshape(81)]
    return np.array(grid, dtype=np.uint8) if _search(grid, 1, None) else None


def random_solution(rng: np.random.Generator) -> np.ndarray:
    """A uniformly shuffled search from the empty grid: a random valid full grid."""
    grid = [0] * 81
    _search(grid, 1, rng)
    return np.array(grid, dtype=np.uint8)


def make_puzzle(rng: np.random.Generator, clues: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """(puzzle, solution) with a unique solution and at least `clues` givens.

    Clues are removed from a random solution in random order; a removal that would admit a
    second solution is undone. The result has exactly `clues` givens, or more when no further
    cell can be removed (17 is the proven minimum; below about 22 the loop usually stops first).
    """
    if not 17 <= clues <= 81:
        raise ValueError(f"clues must be in [17, 81], got {clues}")
    solution = random_solution(rng)
    puzzle = solution.copy()
    given = 81
    for i in rng.permutation(81):
        if given <= clues:
            break
        keep = puzzle[i]
        puzzle[i] = 0
        if count_solutions(puzzle, 2) == 1:
            given -= 1
        else:
            puzzle[i] = keep
    return puzzle, solution


def generate(n: int, seed: int = 0, clues: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """n puzzles with unique solutions: (puzzles, solutions), uint8 arrays of shape (n, 81)."""
    rng = np.random.default_rng(seed)
    pairs = [make_puzzle(rng, clues) for _ in range(n)]
    if not pairs:
        return np.zeros((0, 81), np.uint8), np.zeros((0, 81), np.uint8)
    return np.stack([p for p, _ in pairs]), np.stack([s for _, s in pairs])


def is_valid_solution(grid: np.ndarray) -> bool:
    """Every row, column and box of a full grid holds 1..9 exactly once."""
    g = np.asarray(grid).reshape(9, 9).astype(np.int64)
    target = np.arange(1, 10)
    boxes = g.reshape(3, 3, 3, 3).transpose(0, 2, 1, 3).reshape(9, 9)
    return all(np.array_equal(np.sort(u, axis=1), np.broadcast_to(target, (9, 9)))
               for u in (g, g.T, boxes))


def is_valid_puzzle(puzzle: np.ndarray, solution: np.ndarray) -> bool:
    """`solution` is valid and agrees with every given of `puzzle`."""
    p, s = np.asarray(puzzle).reshape(81), np.asarray(solution).reshape(81)
    return bool(is_valid_solution(s) and np.all((p == 0) | (p == s)))


# -- augmentations --------------------------------------------------------------------------
def _random_cell_maps(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: a cell permutation (n, 81) and a digit relabelling (n, 10), 0 fixed."""
    maps = np.empty((n, 81), dtype=np.int64)
    digits = np.zeros((n, 10), dtype=np.uint8)
    cells = np.arange(81).reshape(9, 9)
    for k in range(n):
        rows = np.concatenate([3 * b + rng.permutation(3) for b in rng.permutation(3)])
        cols = np.concatenate([3 * s + rng.permutation(3) for s in rng.permutation(3)])
        src = cells.T if rng.random() < 0.5 else cells  # transpose
        maps[k] = src[rows][:, cols].reshape(81)
        digits[k, 1:] = rng.permutation(9) + 1
    return maps, digits


def augment(puzzles: np.ndarray, solutions: np.ndarray, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """Apply one random validity-preserving symmetry per sample to (n, 81) puzzles and their
    solutions: digit relabelling, band and stack permutations, row permutations within bands,
    column permutations within stacks, and transposition with probability 1/2."""
    p, s = np.atleast_2d(puzzles), np.atleast_2d(solutions)
    maps, digits = _random_cell_maps(rng, p.shape[0])
    idx = np.arange(p.shape[0])[:, None]
    p2 = digits[idx, np.take_along_axis(p, maps, axis=1)]
    s2 = digits[idx, np.take_along_axis(s, maps, axis=1)]
    return p2.reshape(np.shape(puzzles)), s2.reshape(np.shape(solutions))


# -- Sudoku-Extreme CSV ---------------------------------------------------------------------
class SudokuFormatError(ValueError):
    """A malformed Sudoku CSV file; the message names the file and line."""


@dataclass
class SudokuSet:
    puzzles: np.ndarray  # (n, 81) uint8, 0 = blank
    solutions: np.ndarray  # (n, 81) uint8
    ratings: np.ndarray  # (n,) float
    sources: list[str]

    def __len__(self) -> int:
        return len(self.puzzles)


_HEADER = ["source", "question", "answer", "rating"]
_Q_CHARS = set(".0123456789")
_A_CHARS = set("123456789")


def load_sudoku_csv(path: str | os.PathLike, limit: int | None = None,
                    min_rating: float | None = None, check_solutions: bool = True) -> SudokuSet:
    """Read the Sudoku-Extreme CSV format: header `source,question,answer,rating`, 81-character
    question (`.` or `0` for blanks) and answer strings. Any malformed row raises
    SudokuFormatError naming its line number. `check_solutions` also verifies that every answer
    is a valid grid that agrees with its question's givens."""
    puzzles, solutions, ratings, sources = [], [], [], []
    with open(path, newline="") as f:
        reader = csv.reader(f)

        def fail(msg: str) -> SudokuFormatError:
            return SudokuFormatError(f"{path}:{reader.line_num}: {msg}")

        header = next(reader, None)
        if header is None:
            raise SudokuFormatError(f"{path}:1: empty file (expected header {','.join(_HEADER)})")
        if [h.strip().lower() for h in header] != _HEADER:
            raise fail(f"expected header {','.join(_HEADER)}, got {','.join(header)}")
        for row in reader:
            if not row:
                continue
            if len(row) != 4:
                raise fail(f"expected 4 columns, got {len(row)}")
            source, q, a, rating = row
            if len(q) != 81 or not set(q) <= _Q_CHARS:
                raise fail("question must be 81 characters of 1-9 with '.' or '0' for blanks")
            if len(a) != 81 or not set(a) <= _A_CHARS:
                raise fail("answer must be 81 characters of 1-9")
            try:
                r = float(rating)
            except ValueError:
                raise fail(f"rating must be a number, got {rating!r}") from None
            p = np.frombuffer(q.replace(".", "0").encode(), dtype=np.uint8) - ord("0")
            s = np.frombuffer(a.encode(), dtype=np.uint8) - ord("0")
            if check_solutions and not is_valid_puzzle(p, s):
                raise fail("answer is not a valid solution of the question")
            if min_rating is not None and r < min_rating:
                continue
            puzzles.append(p)
            solutions.append(s)
            ratings.append(r)
            sources.append(source)
            if limit is not None and len(puzzles) >= limit:
                break
    if not puzzles:
        raise SudokuFormatError(f"{path}: no puzzles")
    return SudokuSet(np.stack(puzzles), np.stack(solutions), np.array(ratings), sources)


def write_sudoku_csv(path: str | os.PathLike, puzzles: np.ndarray, solutions: np.ndarray,
                     source: str = "generated") -> None:
    """Write puzzles in the Sudoku-Extreme format; the rating column holds the blank count."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_HEADER)
        for p, s in zip(puzzles, solutions):
            q = "".join("." if v == 0 else str(v) for v in p)
            w.writerow([source, q, "".join(map(str, s)), int((p == 0).sum())])


# -- batches ----------------------------------------------------------------------------
def encode(puzzles: np.ndarray, solutions: np.ndarray) -> dict[str, torch.Tensor]:
    """Model batch: inputs = cell + 1 (blank 1), labels = digit + 1, one shared puzzle id 0."""
    p = torch.from_numpy(np.ascontiguousarray(puzzles)).long()
    s = torch.from_numpy(np.ascontiguousarray(solutions)).long()
    return {"inputs": p + 1, "labels": s + 1, "puzzle_ids": torch.zeros(len(p), dtype=torch.long)}


class PuzzleStream:
    """Endless batches from a pool: each epoch visits the pool in a fresh random order, and each
    sample gets a fresh random augmentation. Its whole position is `state_dict()`."""

    def __init__(self, puzzles: np.ndarray, solutions: np.ndarray, batch_size: int,
                 seed: int = 0, augment: bool = True) -> None:
        if len(puzzles) == 0:
            raise ValueError("PuzzleStream: empty pool")
        self.puzzles, self.solutions = puzzles, solutions
        self.batch_size, self.augment = batch_size, augment
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(puzzles))
        self.pos = 0

    def _take(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            if self.pos == len(self.order):
                self.order, self.pos = self.rng.permutation(len(self.puzzles)), 0
            k = min(n, len(self.order) - self.pos)
            out.append(self.order[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(out)

    def __iter__(self) -> PuzzleStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        idx = self._take(self.batch_size)
        p, s = self.puzzles[idx], self.solutions[idx]
        if self.augment:
            p, s = augment(p, s, self.rng)
        return encode(p, s)

    def state_dict(self) -> dict[str, object]:
        return {"rng": self.rng.bit_generator.state, "order": self.order.copy(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order, self.pos = np.asarray(state["order"]).copy(), int(state["pos"])
