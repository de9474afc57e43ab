"""fastmvit's benchmarks: one timing harness (``harness``) and what a run records (``results``), the engines compared (``engines.ENGINES``),
the roofline model (``roofline``) and device peaks (``peaks``), kernel microbenchmarks (``kernels``)
and the report (``report``). ``python -m fastmvit bench`` runs ``main``; ``pytest bench/`` uses the same
pieces.

Importing this package imports no optional library (timm, transformers, matplotlib, tqdm, triton):
each is imported where it is used, and its absence is reported, not raised.
"""
from .cli import main, run_matrix
from .engines import ENGINES, Engine, Unavailable
from .harness import Budget, measure_interleaved, time_call
from .results import Result, Run, Stats, environment
from .roofline import PLANS, Profile, profile, roofline_row

__all__ = [
    "main", "run_matrix", "ENGINES", "Engine", "Unavailable", "Budget", "Result", "Run", "Stats",
    "environment", "measure_interleaved", "time_call", "PLANS", "Profile", "profile", "roofline_row",
]
