"""Triton kernels of fastmvit, installed as ``fastmvit.kernels``.

Pure Triton: one file per kernel family with its launcher; nothing here imports the model. Each kernel has
a plain-PyTorch reference in ``fastmvit.ops.reference`` that the tests and benchmarks share.
"""
