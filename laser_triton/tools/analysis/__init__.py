"""`laser-triton analyze`: activation-manifold analysis of a TRM (entry point: `analyze`).

`capture` records the matrices LASER would compress, `spectra` measures them, `analyze` runs
the command and `plots` draws its figures.
"""
