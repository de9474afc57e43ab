"""Test-only stand-in that makes ``import timm`` work on a CPU machine without a loadable torchvision.

Why: timm imports torchvision at import time (``torchvision.ops.misc.FrozenBatchNorm2d`` in its layers,
``torchvision.transforms`` and ``torchvision.datasets`` in timm.data). The model code fastmvit is compared
with never uses torchvision, and timm's eval transforms only use torchvision's pure-Python PIL
transforms. But no torchvision wheel on the package index loads with the CPU torch here: its package
``__init__`` loads a C++ ops library built for another torch and registers kernels for it, and fails.

What: ``.ci/setup_timm.sh`` unpacks torchvision's wheel (its Python files only, compiled parts deleted) into
``<sys.prefix>/torchvision-py``, outside the environment's import path. ``install()`` registers a
``torchvision`` package module whose ``__path__`` is that folder *without running its __init__*, so
``import torchvision.transforms`` / ``torchvision.ops.misc`` / ``torchvision.datasets`` execute
torchvision's own, unmodified Python code. Nothing is hand-written: timm's preprocessing in the tests is
timm's and torchvision's code. Anything that needs the C++ ops (nms, roi_align, video/image decoding) would
fail when called; no test calls it.

Never installed with fastmvit; used only by tests/conftest.py. Does nothing where a real torchvision
imports (e.g. the GPU image).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Optional

SOURCES_ENV = "FASTMVIT_TORCHVISION_PY"  # override for the folder that holds torchvision/


def sources_dir() -> Optional[str]:
    """Where .ci/setup_timm.sh unpacked torchvision's Python files, or None."""
    root = os.environ.get(SOURCES_ENV) or os.path.join(sys.prefix, "torchvision-py")
    pkg = os.path.join(root, "torchvision")
    return pkg if os.path.isfile(os.path.join(pkg, "transforms", "functional.py")) else None


def install() -> str:
    """Make ``torchvision`` importable for timm; return a line saying which torchvision is in use."""
    if "torchvision" in sys.modules:
        return f"torchvision already imported ({getattr(sys.modules['torchvision'], '__file__', '?')})"
    try:
        import torchvision  # a real, loadable torchvision: use it

        return f"torchvision {torchvision.__version__} (installed)"
    except Exception:  # not installed, or installed for another torch: its __init__ raises
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    pkg = sources_dir()
    if pkg is None:
        return "no torchvision: run .ci/setup_timm.sh for the timm tests"
    module = types.ModuleType("torchvision", "torchvision's Python sources without its C++-loading __init__ "
                                             "(tests/torchvision_standin.py)")
    spec = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    spec.submodule_search_locations = [pkg]
    module.__spec__, module.__path__, module.__file__ = spec, [pkg], os.path.join(pkg, "__init__.py")
    # The few package-level names torchvision's own submodules read from the package.
    module._image_backend, module._video_backend = "PIL", "pyav"
    module.get_image_backend = lambda: module._image_backend
    module._is_tracing = lambda: False
    sys.modules["torchvision"] = module
    version = importlib.util.spec_from_file_location("torchvision.version", os.path.join(pkg, "version.py"))
    ver = importlib.util.module_from_spec(version)
    version.loader.exec_module(ver)
    module.__version__ = ver.__version__
    return f"torchvision {ver.__version__} Python sources from {pkg} (stand-in: C++ ops not loaded)"
