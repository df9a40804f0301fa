"""Sudoku data: solver, generator (validity, uniqueness, difficulty), augmentations, CSV loader,
and the checkpointable batch stream."""

from __future__ import annotations

import numpy as np
import pytest

from laser_triton.data import sudoku as S

# A well-known puzzle (30 givens) and its unique solution.
PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


def _grid(s: str) -> np.ndarray:
    return np.frombuffer(s.replace(".", "0").encode(), dtype=np.uint8) - ord("0")


def test_solver_known_puzzle():
    p = _grid(PUZZLE)
    assert S.count_solutions(p) == 1
    assert np.array_equal(S.solve(p), _grid(SOLUTION))
    assert S.is_valid_puzzle(p, _grid(SOLUTION))


def test_solver_counts_and_contradictions():
    assert S.count_solutions(np.zeros(81, np.uint8), limit=2) == 2
    assert S.count_solutions(np.zeros(81, np.uint8), limit=5) == 5
    clash = np.zeros(81, np.uint8)
    clash[0] = clash[1] = 5  # same digit twice in a row
    assert S.count_solutions(clash) == 0
    assert S.solve(clash) is None
    full = _grid(SOLUTION)
    assert S.count_solutions(full) == 1
    wrong = full.copy()
    wrong[0], wrong[1] = wrong[1], wrong[0]
    assert S.count_solutions(wrong) == 0


def test_random_solution_is_valid():
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert S.is_valid_solution(S.random_solution(rng))


@pytest.mark.parametrize("clues", [45, 30])
def test_generator_validity_uniqueness_and_difficulty(clues):
    puzzles, solutions = S.generate(8, seed=3, clues=clues)
    assert puzzles.shape == solutions.shape == (8, 81)
    for p, s in zip(puzzles, solutions):
        assert S.is_valid_puzzle(p, s)
        assert S.count_solutions(p) == 1
        assert int((p > 0).sum()) == clues  # reachable exactly at these clue counts


def test_generator_is_seeded_and_clue_count_controls_difficulty():
    a, _ = S.generate(3, seed=7, clues=40)
    b, _ = S.generate(3, seed=7, clues=40)
    c, _ = S.generate(3, seed=8, clues=40)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    hard, _ = S.generate(3, seed=1, clues=17)  # removes as far as uniqueness allows
    assert all(17 <= (p > 0).sum() < 35 for p in hard)
    with pytest.raises(ValueError):
        S.make_puzzle(np.random.default_rng(0), clues=10)


def test_augmentations_keep_validity_uniqueness_and_givens():
    puzzles, solutions = S.generate(6, seed=11, clues=32)
    rng = np.random.default_rng(0)
    for _ in range(4):
        p2, s2 = S.augment(puzzles, solutions, rng)
        for p, q, t in zip(puzzles, p2, s2):
            assert S.is_valid_puzzle(q, t)
            assert (q > 0).sum() == (p > 0).sum()
            assert S.count_solutions(q) == 1
            assert np.array_equal(S.solve(q), t)


def test_augmentation_components_each_preserve_validity():
    """Every generator of the symmetry group on its own (a band swap, a row swap inside a band,
    a stack swap, a column swap inside a stack, transposition, relabelling) keeps a grid valid,
    and the random augmentation uses transposition and non-trivial relabelling."""
    g = _grid(SOLUTION).reshape(9, 9)
    assert S.is_valid_solution(g[[3, 4, 5, 0, 1, 2, 6, 7, 8]])
    assert S.is_valid_solution(g[[1, 0, 2, 3, 4, 5, 6, 7, 8]])
    assert S.is_valid_solution(g[:, [6, 7, 8, 3, 4, 5, 0, 1, 2]])
    assert S.is_valid_solution(g[:, [0, 2, 1, 3, 4, 5, 6, 7, 8]])
    assert S.is_valid_solution(g.T)
    relabel = np.array([0, 9, 8, 7, 6, 5, 4, 3, 2, 1], np.uint8)
    assert S.is_valid_solution(relabel[g])
    assert not S.is_valid_solution(g[[3, 1, 2, 0, 4, 5, 6, 7, 8]])  # rows across bands: broken
    maps, digits = S._random_cell_maps(np.random.default_rng(1), 64)
    # Output row 0 comes from one source row, or (transposed) from one source column.
    from_row = [len(set(m[:9] // 9)) == 1 for m in maps]
    from_col = [len(set(m[:9] % 9)) == 1 for m in maps]
    assert all(r != c for r, c in zip(from_row, from_col))
    assert any(from_col) and any(from_row)
    assert all(sorted(d[1:]) == list(range(1, 10)) and d[0] == 0 for d in digits)


def test_encode():
    b = S.encode(_grid(PUZZLE)[None], _grid(SOLUTION)[None])
    assert b["inputs"][0, 2].item() == 1  # blank -> 1
    assert b["inputs"][0, 0].item() == 6  # digit 5 -> 6
    assert b["labels"].min().item() >= 2 and b["labels"].max().item() <= 10
    assert b["puzzle_ids"].tolist() == [0]


# -- CSV loader ------------------------------------------------------------------------------
def _write(tmp_path, text: str):
    path = tmp_path / "s.csv"
    path.write_text(text)
    return path


GOOD = f"source,question,answer,rating\nx,{PUZZLE},{SOLUTION},3\ny,{PUZZLE.replace('.', '0')},{SOLUTION},0\n"


def test_loader_reads_both_blank_spellings(tmp_path):
    s = S.load_sudoku_csv(_write(tmp_path, GOOD))
    assert len(s) == 2 and s.sources == ["x", "y"]
    assert np.array_equal(s.puzzles[0], s.puzzles[1])
    assert np.array_equal(s.puzzles[0], _grid(PUZZLE))
    assert s.ratings.tolist() == [3.0, 0.0]
    assert len(S.load_sudoku_csv(_write(tmp_path, GOOD), min_rating=1)) == 1


def test_loader_roundtrip_with_writer(tmp_path):
    p, s = S.generate(3, seed=2, clues=40)
    path = tmp_path / "gen.csv"
    S.write_sudoku_csv(path, p, s)
    got = S.load_sudoku_csv(path)
    assert np.array_equal(got.puzzles, p) and np.array_equal(got.solutions, s)


@pytest.mark.parametrize("row, line, match", [
    (f"x,{PUZZLE[:-1]},{SOLUTION},1", 3, "question"),
    (f"x,{PUZZLE[:-1]}a,{SOLUTION},1", 3, "question"),
    (f"x,{PUZZLE},{SOLUTION[:-1]}0,1", 3, "answer"),
    (f"x,{PUZZLE},{SOLUTION},hard", 3, "rating"),
    (f"x,{PUZZLE},{SOLUTION}", 3, "4 columns"),
    (f"x,{PUZZLE.replace('.', '1', 1)},{SOLUTION},1", 3, "not a valid solution"),
    (f"x,{PUZZLE},{SOLUTION[1:] + SOLUTION[0]},1", 3, "not a valid solution"),
])
def test_loader_rejects_malformed_rows_with_line_number(tmp_path, row, line, match):
    text = f"source,question,answer,rating\nok,{PUZZLE},{SOLUTION},1\n{row}\n"
    with pytest.raises(S.SudokuFormatError, match=match) as e:
        S.load_sudoku_csv(_write(tmp_path, text))
    assert f"s.csv:{line}:" in str(e.value)


def test_loader_rejects_bad_header_and_empty(tmp_path):
    with pytest.raises(S.SudokuFormatError, match=r":1: expected header"):
        S.load_sudoku_csv(_write(tmp_path, f"q,a\n{PUZZLE},{SOLUTION}\n"))
    with pytest.raises(S.SudokuFormatError, match="empty"):
        S.load_sudoku_csv(_write(tmp_path, ""))
    with pytest.raises(S.SudokuFormatError, match="no puzzles"):
        S.load_sudoku_csv(_write(tmp_path, "source,question,answer,rating\n"))


# -- stream --------------------------------------------------------------------------------------
def test_stream_state_roundtrip_and_epochs():
    p, s = S.generate(5, seed=4, clues=45)
    stream = S.PuzzleStream(p, s, batch_size=3, seed=0)
    next(stream)
    state = stream.state_dict()
    a = [next(stream) for _ in range(4)]  # crosses epoch boundaries (5 puzzles, 3 per batch)
    stream.load_state_dict(state)
    b = [next(stream) for _ in range(4)]
    for x, y in zip(a, b):
        assert all(np.array_equal(x[k].numpy(), y[k].numpy()) for k in x)
    for batch in a:
        for q, t in zip(batch["inputs"].numpy() - 1, batch["labels"].numpy() - 1):
            assert S.is_valid_puzzle(q, t)
