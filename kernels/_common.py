"""Helpers every kernel module shares: interpreter detection, launching, output allocation, dtype names,
SiLU, vector widths and the compile-check record."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

# Triton's type names for the activation dtypes fastmvit runs in.
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# Triton chose interpreted or compiled kernels when they were decorated, at import: so does fastmvit.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when kernels run under TRITON_INTERPRET=1 (CPU tests): launchers then pick one large block
    configuration, since the interpreter's cost grows with the number of programs, not their size."""
    return INTERPRET


def launch(kernel, grid, *args, **meta) -> None:
    """``wrap_triton(kernel)[grid](*args, **meta)``: traceable by torch.compile and CUDA graphs.

    Under the interpreter a kernel cannot be traced into a graph: with fake tensors (opcheck, shape
    propagation) nothing runs, since torch needs only the outputs' metadata; a functional trace (the
    graph torch.compile would run) is refused, because skipping the kernel there would leave its output
    unwritten in the compiled graph."""
    if INTERPRET:
        from torch._subclasses.fake_tensor import FakeTensor, is_fake

        tensors = [t for t in args if isinstance(t, torch.Tensor)]
        if any(isinstance(t, FakeTensor) for t in tensors):
            return
        if any(is_fake(t) for t in tensors):
            raise RuntimeError("interpreted Triton kernels (TRITON_INTERPRET=1) cannot be traced by "
                               "torch.compile; compile fastmvit's engine on a GPU")
    torch.library.wrap_triton(kernel)[grid](*args, **meta)


class Launch:
    """One kernel launch resolved for one input signature: grid, scalar arguments (they follow the
    pointers in every kernel here) and constexprs fixed; a call passes the tensors.

    ``launch(*tensors)`` is the eager path: ``kernel.run``, exactly what ``kernel[grid](...)`` calls, with
    no custom-op dispatch or ``wrap_triton`` in front. ``launch.traced(*tensors)`` goes through
    ``wrap_triton`` (the registered ops' bodies, which torch.compile traces). Either way Triton launches
    on its *current* device and that device's current stream (``JITFunction.run`` asks the driver), not
    on the tensors' device: the engine runs each forward under a guard on the input's device, and
    whoever calls a launcher directly must do the same."""

    __slots__ = ("kernel", "grid", "scalars", "meta")

    def __init__(self, kernel, grid: Tuple[int, ...], scalars: Tuple[Any, ...], **meta):
        self.kernel, self.grid, self.scalars, self.meta = kernel, tuple(grid), tuple(scalars), meta

    def __call__(self, *tensors) -> None:
        self.kernel.run(*tensors, *self.scalars, grid=self.grid, warmup=False, **self.meta)

    def traced(self, *tensors) -> None:
        launch(self.kernel, self.grid, *tensors, *self.scalars, **self.meta)

    def __repr__(self) -> str:
        name = getattr(self.kernel, "__name__", type(self.kernel).__name__)
        return f"Launch({name}, grid={self.grid}, {self.meta})"


def poisoning() -> bool:
    """FASTMVIT_POISON_OUTPUTS=1 (the tests set it): outputs start NaN-filled, so an element a kernel fails
    to write shows up as NaN, in a kernel test or deep inside the model. Read when a launch is resolved,
    not per launch of a resolved one."""
    return os.environ.get("FASTMVIT_POISON_OUTPUTS") == "1"


def empty_output(shape, dtype: torch.dtype, device, poison: Optional[bool] = None) -> torch.Tensor:
    """``torch.empty`` for a kernel's output; NaN-filled when ``poison`` (default: ``poisoning()``)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning() if poison is None else poison:
        out.fill_(float("nan"))
    return out


@dataclass(frozen=True)
class CompileConfig:
    """One kernel specialisation the engine launches, for ``python -m fastmvit.kernels check`` to compile
    ahead of time for sm_90 / sm_80 without a GPU.

    signature: every argument name -> Triton type ("*fp16", "*fp32", "i32", "fp32", "constexpr").
    constexprs: the values of the constexpr arguments.
    aligned: integer arguments the launcher always passes as multiples of 16 (Triton's JIT specialises
        on that at run time); pointers are 16-byte aligned without saying so, as torch's allocator
        guarantees. Without these an ahead-of-time compile emits scalar loads and reports registers that
        are not those of the kernel that runs.
    """

    name: str
    fn: Any
    signature: Dict[str, str]
    constexprs: Dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    aligned: Tuple[str, ...] = ()

    def specialisation(self) -> Dict[Tuple[int], list]:
        """``ASTSource(attrs=...)``: 16-divisibility of every pointer and of the ``aligned`` integers."""
        return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(self.signature.items())
                if ty.startswith("*") or name in self.aligned}


@triton.jit
def silu(x):
    """SiLU in float32: ex2.approx + one approximate division on the GPU (two MUFU ops per element)."""
    return x / (1.0 + tl.exp(-x))


def vec_width(dtype: torch.dtype, *strides: int) -> int:
    """Elements per 16-byte vector when every given stride (and channel count) is a multiple of it, else 1.
    Kernels round these integers down to that multiple (a no-op then) so Triton can prove the alignment and
    emit 16-byte accesses even where a stride is not a multiple of 16 (C = 24, 40). Base-pointer alignment
    is Triton's own run-time specialisation (a misaligned view just gets narrower accesses)."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    return vec if all(s % vec == 0 for s in strides) else 1


# --------------------------------------------------------------------------------------------------
# batch-1 work distribution: the SM count and the split rule
# --------------------------------------------------------------------------------------------------

# H100 SXM figures (sm_90), estimates from the kernels' structure, not measurements (ops.mv2_block's fuse
# rule uses the same ones); a GPU visit re-fits them with ``python -m fastmvit info --plan``.
DEFAULT_SM_COUNT = 132
DRAM_BW = 2.7e12          # bytes/s, ~80 % of 3.35 TB/s
LAUNCH_COST = 2.5e-6      # seconds a kernel costs beyond its roofline time (launch gap, ramp, tail)
STEP_GEMM = 0.1e-6        # one K step of a pipelined GEMM-like loop (loads issued num_stages - 1 steps ahead)
SPLIT_MARGIN = 0.9        # split only when predicted at least 10 % faster: the model is unmeasured
MAX_SPLIT = 16            # partial slots: beyond this the merge's reads grow and the grids are full anyway

_SM_COUNT: Dict[int, int] = {}


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device``: asked of the driver once per CUDA device; for CPU tensors
    (the interpreter, ``info --plan``) ``FASTMVIT_SM_COUNT`` (default 132, an H100 SXM). Launch rules call
    this when a plan is resolved, never per launch."""
    device = torch.device(device)
    if device.type != "cuda":
        text = os.environ.get("FASTMVIT_SM_COUNT", "").strip()
        if not text:
            return DEFAULT_SM_COUNT
        if not text.isdigit() or int(text) < 1:
            from fastmvit.errors import OptionError
            raise OptionError(f"FASTMVIT_SM_COUNT must be a positive integer (SMs of the GPU to plan for), "
                              f"got {text!r}")
        return int(text)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def split_override() -> Optional[int]:
    """``FASTMVIT_SPLIT``: unset or empty -> None (the rule decides); N >= 1 forces a split of N (capped
    per kernel by its serial steps) wherever a kernel can split; 1 turns splitting off. For a GPU visit to
    compare both sides of the rule."""
    text = os.environ.get("FASTMVIT_SPLIT", "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        from fastmvit.errors import OptionError
        raise OptionError(f"FASTMVIT_SPLIT must be a positive integer (1 = never split, N = split by N), "
                          f"got {text!r}")
    return int(text)


def waves_latency(ctas: int, steps: int, step: float, sms: int, ctas_per_sm: int = 1) -> float:
    """Seconds a grid of ``ctas`` programs, each running ``steps`` dependent steps of ``step`` seconds,
    needs at least: waves x serial depth x step latency."""
    return -(-ctas // (sms * ctas_per_sm)) * steps * step


class SplitDecision(NamedTuple):
    """What ``split_rule`` decided for one launch: ``n`` partial slots (1: unsplit), the grid it judged
    (``ctas`` x ``steps``), the predicted seconds unsplit and with the best split it considered
    (``best_n``), and whether ``n`` was forced (argument or ``FASTMVIT_SPLIT``)."""
    n: int
    ctas: int
    steps: int
    unsplit_s: float
    best_n: int
    split_s: float
    forced: bool
    kernel: str = ""


# ``info --plan`` sets this to a list: every decision is appended as ("split", decision), in launch order.
SPLIT_LOG: Optional[list] = None


def split_estimate(ctas: int, steps: int, step: float, sms: int, n: int, *, partial_bytes: int = 0,
                   merge_ctas: int = 1, ctas_per_sm: int = 1) -> float:
    """Predicted seconds of a split by ``n``: the first pass (``n`` x the CTAs, ``ceil(steps / n)`` steps
    each) plus the merge pass (a launch, one wave-step per merge wave: its ``n`` loads are independent,
    and the fp32 partials written then read back, ``2 * n * partial_bytes`` through DRAM)."""
    first = waves_latency(ctas * n, -(-steps // n), step, sms, ctas_per_sm)
    merge = LAUNCH_COST + waves_latency(merge_ctas, 1, step, sms) + 2 * n * partial_bytes / DRAM_BW
    return first + merge


def split_rule(ctas: int, serial_steps: int, step_latency: float, sms: int, *, partial_bytes: int = 0,
               merge_ctas: int = 1, ctas_per_sm: int = 1, max_split: int = MAX_SPLIT,
               force: Optional[int] = None, kernel: str = "", interpret: Optional[bool] = None) -> SplitDecision:
    """How many ways to split a launch's serial loop (K steps, tokens), resolved once per signature.

    Unsplit: ``waves x serial_steps x step_latency``. Split by n (2 .. min(max_split, serial_steps)):
    ``split_estimate`` (n x the CTAs over a 1/n-th of the steps, plus the merge pass; ``partial_bytes``:
    one slot of fp32 partials). The best n is taken only when predicted at least 10 % faster
    (``SPLIT_MARGIN``). ``force`` (else ``FASTMVIT_SPLIT``) overrides, capped at the steps and
    ``max_split``. Under the interpreter nothing splits unless forced (its cost grows with the programs).
    ``max_split=1``: a kernel that cannot split, judged for ``info --plan`` only."""
    unsplit = waves_latency(ctas, serial_steps, step_latency, sms, ctas_per_sm)
    best_n, best = 1, unsplit
    limit = max(1, min(max_split, MAX_SPLIT, serial_steps))
    for n in range(2, (limit if max_split > 1 else min(MAX_SPLIT, serial_steps)) + 1):
        est = split_estimate(ctas, serial_steps, step_latency, sms, n, partial_bytes=partial_bytes,
                             merge_ctas=merge_ctas, ctas_per_sm=ctas_per_sm)
        if best_n == 1 or est < best:
            best_n, best = n, est
    if force is None:
        force = split_override()
    if force is not None:
        n = min(force, limit)
    elif best_n <= limit and best <= SPLIT_MARGIN * unsplit and not (interpreting() if interpret is None
                                                                     else interpret):
        n = best_n
    else:
        n = 1
    decision = SplitDecision(n, ctas, serial_steps, unsplit, best_n, best, force is not None, kernel)
    if SPLIT_LOG is not None:
        SPLIT_LOG.append(("split", decision))
    return decision
