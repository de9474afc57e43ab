"""What ``python -m fastmvit info`` reports: versions, devices, the compiled extension and, per op, the
backend the engine would use. Reading this never initialises CUDA beyond querying devices."""
from __future__ import annotations

import importlib
import platform
from typing import Dict


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as e:  # absent or broken: say which
        return f"not available ({type(e).__name__})"


def collect_info() -> Dict[str, object]:
    import torch

    from . import __version__

    info: Dict[str, object] = {
        "fastmvit": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "safetensors": _version("safetensors"),
        "huggingface_hub": _version("huggingface_hub"),
        "pillow": _version("PIL"),
    }
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    info["devices"] = devices or ["cpu only"]
    from .cpu import auto_summary

    info["CPU engine (backend='auto' on CPU tensors)"] = auto_summary()
    try:
        from .engine.backends import extension_status, op_backends
    except ImportError:
        info["compiled extension (fastmvit._C)"] = "engine not available"
    else:
        info["compiled extension (fastmvit._C)"] = extension_status()
        info["op backends"] = op_backends()
    return info


def format_info(info: Dict[str, object]) -> str:
    width = max(len(k) for k in info)
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            inner = max(len(k) for k in value) if value else 0
            lines += [f"  {k:<{inner}}  {v}" for k, v in value.items()]
        elif isinstance(value, list):
            lines.append(f"{key:<{width}}  {value[0] if value else ''}")
            lines += [f"{'':<{width}}  {v}" for v in value[1:]]
        else:
            lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)
