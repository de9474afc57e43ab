"""The optional CUDA C++ extension ``fastmvit._C``: whether it was built and loaded, its ops registered
for torch, and a compile check of its sources that needs only nvcc.

Importing this module never fails and never initialises CUDA: when ``fastmvit._C`` is absent (a CPU
build of torch, no nvcc at install time) ``available()`` is False, ``extension_status()`` says why and
the ops raise a clear error if called.

    fastmvit.ops.cuda_ext.available() -> bool
    fastmvit.ops.cuda_ext.extension_status() -> str
    fastmvit.ops.cuda_ext.dwconv3x3_cuda(x, w, bias, *, stride=1, dilation=1, act=True) -> Tensor
        # fastmvit::dwconv3x3_cuda; same contract as fastmvit.ops.dwconv.dwconv3x3 (x [B, H, W, C] CUDA,
        # w [9, C] and bias [C] float32 from pack_dwconv3x3), computed by csrc/dwconv.cu (dilation 1, 2;
        # any other dilation by the Triton kernel)
    fastmvit.ops.cuda_ext.nvcc_check(arch="sm_90") -> list[KernelResources]   # compile only, no GPU

Which implementation of the depthwise conv the engine should use (this one or the Triton kernel) is
a GPU measurement that has not been made; until then the Triton kernel is the default.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import List, Optional

import torch

from ._common import inference_only

__all__ = ["available", "extension_status", "dwconv3x3_cuda", "nvcc_check", "KernelResources", "CSRC"]

# The sources, when running from a checkout (an installed wheel carries the compiled module only).
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
# The flags setup.py gives nvcc, plus those torch's CUDAExtension adds: compile-check what gets built.
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]

# The dilations csrc/dwconv.cu is instantiated for (its DIL template argument); others go to Triton.
CSRC_DILATIONS = (1, 2)

try:
    _C = importlib.import_module("fastmvit._C")
    _LOAD_ERROR: Optional[str] = None
    _BUILT = True
except ImportError as e:  # not built (the usual case without a CUDA toolkit) or built but unloadable
    _C = None
    _LOAD_ERROR = str(e)
    _BUILT = not (isinstance(e, ModuleNotFoundError) and e.name == "fastmvit._C")


def available() -> bool:
    """True when ``fastmvit._C`` was built and imports."""
    return _C is not None


def extension_status() -> str:
    """One line for ``python -m fastmvit info``."""
    if _C is not None:
        return f"built and loaded ({_C.__file__})"
    if not _BUILT:
        return ("not built (needs nvcc and a CUDA build of torch at install time: "
                "pip install --no-build-isolation .); the Triton kernels are used")
    return f"built but failed to load: {_LOAD_ERROR}"


# --------------------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastmvit::dwconv3x3_cuda", mutates_args=())
def _dwconv3x3_cuda_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, stride: int, dilation: int,
                       act: bool) -> torch.Tensor:
    if _C is None:
        raise RuntimeError(f"fastmvit::dwconv3x3_cuda needs the CUDA extension, which is {extension_status()}")
    return _C.dwconv3x3(x, w, bias, stride, dilation, act)


@_dwconv3x3_cuda_op.register_fake
def _(x, w, bias, stride, dilation, act):
    B, H, W, C = x.shape
    return x.new_empty((B, (H - 1) // stride + 1, (W - 1) // stride + 1, C))


inference_only(_dwconv3x3_cuda_op, "fastmvit::dwconv3x3_cuda")


def dwconv3x3_cuda(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, *, stride: int = 1, dilation: int = 1,
                   act: bool = True) -> torch.Tensor:
    """The CUDA C++ depthwise 3x3 (+ bias, + SiLU if ``act``): same contract as
    ``fastmvit.ops.dwconv.dwconv3x3``, except that x is made contiguous if it is not. The C++ kernel is
    instantiated for dilation 1 and 2 only: any other dilation (4 in the output-stride-8 segmentation
    backbones) runs the Triton kernel instead."""
    if dilation not in CSRC_DILATIONS:
        from .dwconv import dwconv3x3

        return dwconv3x3(x, w, bias, stride=stride, dilation=dilation, act=act)
    return _dwconv3x3_cuda_op(x.contiguous(), w, bias, stride, dilation, act)


# --------------------------------------------------------------------------------------------------
# compile check
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelResources:
    """ptxas's account of one kernel instantiation, plus its 16-byte global accesses in the SASS."""

    name: str              # e.g. "dwconv3x3<float16, vec=8, stride=1, dilation=1>"
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    ldg128: int = -1       # LDG.*.128 instructions (-1: cuobjdump not found)
    stg128: int = -1

    @property
    def spills(self) -> bool:
        return bool(self.stack_bytes or self.spill_stores or self.spill_loads)


def nvcc_path() -> Optional[str]:
    """The nvcc torch's build would use: $CUDA_HOME/bin/nvcc, else the one on PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


_TYPES = {"f": "float32", "6__half": "float16", "13__nv_bfloat16": "bfloat16"}


def _pretty(mangled: str) -> str:
    m = re.search(r"dwconv3x3_kernelI(f|6__half|13__nv_bfloat16)Li(\d+)ELi(\d+)ELi(\d+)E", mangled)
    if not m:
        return mangled
    t, vec, stride, dil = m.groups()
    return f"dwconv3x3<{_TYPES[t]}, vec={vec}, stride={stride}, dilation={dil}>"


def nvcc_check(arch: str = "sm_90", nvcc: Optional[str] = None, source: Optional[str] = None) -> List[KernelResources]:
    """Compile ``csrc/dwconv.cu`` (no torch header, so a CUDA toolkit alone suffices) for ``arch`` with the
    extension's flags and return every kernel's registers, stack, spills and shared memory; counts the
    16-byte loads/stores in the SASS when cuobjdump is found. Raises RuntimeError if nvcc fails,
    FileNotFoundError without nvcc or the sources."""
    nvcc = nvcc or nvcc_path()
    if not nvcc:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    source = source or os.path.join(CSRC, "dwconv.cu")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source} not found: nvcc_check needs a source checkout of fastmvit")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "dwconv.cubin")
        cmd = [nvcc, f"-arch={arch}", "-cubin", "--resource-usage", *NVCC_FLAGS, "-o", cubin, source]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{run.stderr}")
        wide = _wide_accesses(nvcc, cubin)
    out, current, frame = [], None, None
    for line in (run.stdout + run.stderr).splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            current = m.group(1)
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            frame = tuple(int(g) for g in m.groups())
        elif (m := re.search(r"Used (\d+) registers", line)) and current:
            smem = re.search(r"(\d+) bytes smem", line)
            ldg, stg = wide.get(current, (-1, -1))
            out.append(KernelResources(_pretty(current), int(m.group(1)), *(frame or (0, 0, 0)),
                                       int(smem.group(1)) if smem else 0, ldg, stg))
            current, frame = None, None
    if not out:
        raise RuntimeError(f"could not read ptxas's resource usage from:\n{run.stdout}{run.stderr}")
    return out


def _cuobjdump_candidates(nvcc: str):
    yield os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            yield os.path.join(home, "bin", "cuobjdump")
    yield shutil.which("cuobjdump")
    try:  # Triton bundles one
        import triton
        yield os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except ImportError:
        pass


def _wide_accesses(nvcc: str, cubin: str) -> dict:
    """{mangled kernel: (LDG.*.128 count, STG.*.128 count)} from cuobjdump's SASS, {} without cuobjdump."""
    tool = next((t for t in _cuobjdump_candidates(nvcc) if t and os.path.isfile(t)), None)
    if tool is None:
        return {}
    sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True).stdout
    counts, current = {}, None
    for line in sass.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            current = m.group(1)
            counts[current] = [0, 0]
        elif current:
            if re.search(r"\bLDG\.\S*128", line):
                counts[current][0] += 1
            elif re.search(r"\bSTG\.\S*128", line):
                counts[current][1] += 1
    return {k: tuple(v) for k, v in counts.items()}
