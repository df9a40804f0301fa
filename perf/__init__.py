"""The benchmarks, as a package of the source checkout (not of the wheel).

Run a script as a module from the checkout's root, e.g. `python -m perf.bench_trm --help`, or
through `laser-triton bench <kernels|trm|report|all>`, which finds this folder and imports it
under a private name (`laser_triton.tools.bench.load_script`). Shared code lives in `harness`
(run metadata, backend switch, time limits, cleanup) and `trm_run` / `trm_variants` (the TRM
runs and the variants compared); the scripts import them relatively.
"""
