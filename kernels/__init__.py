"""Triton kernels of fastmvit, installed as ``fastmvit.kernels``.

Pure Triton: one file per kernel family with its launcher; nothing here imports the model. Each kernel has
a plain-PyTorch reference beside its registered op in ``fastmvit/ops/<family>.py``, shared by the
tests and the benchmarks.
"""
