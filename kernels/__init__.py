"""Triton kernels of fastmvit, installed as ``fastmvit.kernels``.

Pure Triton: one file per kernel family with its launcher; nothing here imports the model. Each kernel has
a plain-PyTorch reference beside its registered op in ``fastmvit/ops/<family>.py``, shared by the
tests and the benchmarks.
"""
import sys as _sys

if __name__ == "kernels":
    # Imported as a top-level package: the checkout's root is on sys.path (``python -m ...`` or pytest run
    # from it) and this folder hides Hugging Face's ``kernels`` distribution, which transformers (>= 5.25)
    # imports whenever it is installed. fastmvit itself only ever imports ``fastmvit.kernels``, so step
    # aside: load the installed ``kernels`` from the rest of sys.path in this module's place, or fail as
    # an absent package would.
    import importlib.util as _util
    import os as _os
    from importlib.machinery import PathFinder as _PathFinder

    _root = _os.path.realpath(_os.path.dirname(_os.path.dirname(__file__)))
    _rest = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != _root]
    _spec = _PathFinder.find_spec("kernels", _rest)
    if _spec is None or _spec.loader is None:
        raise ImportError("no 'kernels' package is installed (this folder is fastmvit's Triton kernels, "
                          "imported as fastmvit.kernels)", name="kernels")
    _real = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _real  # the import statement returns what sys.modules holds after this runs
    _spec.loader.exec_module(_real)
