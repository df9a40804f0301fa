"""Datasets: Sudoku puzzles (generator, augmentations, Sudoku-Extreme CSV loader)."""
