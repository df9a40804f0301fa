"""`laser-triton study`: accuracy studies of LASER against plain training (entry: `runner`).

`runner` is the paired baseline-vs-LASER study and the command line; `protocol` its declared
settings; `trm` trains one run; `report` writes its outputs; `ni` and `ni_report` the
pre-declared non-inferiority study from a trunk (`--protocol FILE`); `stats` the tests both use.
"""
