"""The tools built on the LASER core: the `laser-triton` command and its subcommands.

Dependencies point one way: the tools import the core (`laser_triton.config`, `hooks`,
`tracker`, `storage`, ...) and the model (`laser_triton.trm`, `laser_triton.data`); no core
module imports `laser_triton.tools` (tests/test_imports.py checks it).

- `cli`: the subcommand table; `cliutil`: shared command-line helpers (threads, int checks);
- `trainer` (the `Trainer`), `training` (its configuration and helpers), `train` (its command
  line), `evaluate`, `demo`: training and evaluating a TRM on Sudoku;
- `autotune`, `bench`: the launch-config sweep and the benchmark runner (perf/);
- `livebytes`: live activation-memory measurement shared by the demo, study and perf;
- `lowrank_probe`: the weight gradients `lowrank` serves, against its bound (perf, tests);
- `analysis/`: `laser-triton analyze` (is the saved activation low-rank?);
- `study/`: `laser-triton study` (paired and pre-declared non-inferiority studies).
"""
