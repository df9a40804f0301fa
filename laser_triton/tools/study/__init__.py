"""`laser-triton study`: accuracy studies of LASER against plain training (entry: `runner`).

`runner` is the paired baseline-vs-LASER study and the command line; `protocol` its declared
settings; `trm` trains one run; `report` writes its outputs; `ni` (with `ni_measure`, the
per-step memory and gradient measurements, and `ni_report`) the pre-declared non-inferiority
study from a trunk (`--protocol FILE`), whose code is checked by `code_check`; `stats` the
tests both use.
"""
