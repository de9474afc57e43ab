"""The engines fastmvit is compared with, in one table (``ENGINES``).

Every engine runs the same weights: a seeded random state dict in fastmvit's (timm's) layout, converted
for Hugging Face with ``fastmvit.weights.from_canonical`` and exported to ONNX (by ``torch.onnx.export``, the
way their users do it) for the ONNX Runtime and OpenVINO peers, so the benchmark can check that every engine
computes the same logits. An engine whose library or feature is missing raises ``Unavailable`` with the
reason; the benchmark reports it and goes on.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import OptionError
from ..variants import get_variant

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
PEERS = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}  # CPU runtimes: peers and fastmvit's CPU engine


class Unavailable(Exception):
    """This engine cannot run here; ``str(e)`` says why (a missing library, a feature not built)."""


@functools.lru_cache(maxsize=None)
def reference_weights(variant: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Seeded random weights with non-trivial BatchNorm statistics, float32 on the CPU: BatchNorm left at
    its defaults would be an identity and hide a wrongly converted tensor in the parity check."""
    from ..model import DeepLabV3, MobileViT
    from ..model.random import randomize_
    from ..segmentation import is_segmentation_name, segmentation_variant

    if is_segmentation_name(variant):  # "deeplabv3-s": Apple's head shape (21 classes, output stride 16)
        model = randomize_(DeepLabV3(segmentation_variant(variant)), seed)
    else:
        model = randomize_(MobileViT(variant, 1000), seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_input(batch: int, size: int, device: torch.device, dtype: torch.dtype,
               channels_last: bool = False, seed: int = 1) -> torch.Tensor:
    """Random images in [0, 1] (never zeros: some kernels are faster on them)."""
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    x = x.to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _fastmvit_model(variant: str, backend: Optional[str], cuda_graphs: Optional[bool]) -> nn.Module:
    from .. import load

    kw = {k: v for k, v in (("backend", backend), ("cuda_graphs", cuda_graphs)) if v is not None}
    return load(variant, reference_weights(variant), pretrained=False, **kw)


@functools.lru_cache(maxsize=None)
def _import_problem(module: str) -> str:
    """Why ``module`` cannot be imported ("" when it can)."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception as e:  # not installed, or broken (timm without torchvision, say)
        return f"{module} is not importable ({type(e).__name__}: {e})"
    return ""


def _timm_model(variant: str) -> nn.Module:
    from ..segmentation import is_segmentation_name

    if is_segmentation_name(variant):
        raise Unavailable("timm has no MobileViT segmentation model")
    import timm

    model = timm.create_model(get_variant(variant).timm_name, pretrained=False, num_classes=1000)
    model.load_state_dict(reference_weights(variant))
    return model.eval()


def _hf_config(v, **options):
    import transformers as tr

    if v.family == "v1":
        return tr.MobileViTConfig(hidden_sizes=[s.transformer.dim for s in v.stages[2:]],
                                  neck_hidden_sizes=[v.stem_channels, *v.stage_channels, v.final_conv_channels],
                                  expand_ratio=float(v.stages[0].expand), **options)
    return tr.MobileViTV2Config(width_multiplier=float(v.width), **options)


def hf_model(variant: str) -> nn.Module:
    """Hugging Face's MobileViT / MobileViTV2 for ``variant`` with the reference weights."""
    if _import_problem("transformers"):
        raise Unavailable(_import_problem("transformers"))
    import transformers as tr

    from ..weights import from_canonical

    from ..segmentation import is_segmentation_name

    if is_segmentation_name(variant):
        return _hf_segmentation_model(variant)
    v = get_variant(variant)
    cls = tr.MobileViTForImageClassification if v.family == "v1" else tr.MobileViTV2ForImageClassification
    model = cls(_hf_config(v, num_labels=1000))
    missing, unexpected = model.load_state_dict(from_canonical(reference_weights(variant), v.name, "hf"),
                                                strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(f"HF weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


@functools.lru_cache(maxsize=None)
def _onnx_dir() -> str:
    path = tempfile.mkdtemp(prefix="fastmvit-bench-onnx-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=4)
def exported_onnx(variant: str, batch: int, size: int) -> str:
    """fastmvit's plain-PyTorch model with the reference weights, exported by ``torch.onnx.export`` for one
    static input shape: the file both the ONNX Runtime and the OpenVINO peer load."""
    model = _fastmvit_model(variant, "torch", None)
    path = f"{_onnx_dir()}/{variant}-{batch}x{size}.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent Python branches
        torch.onnx.export(model, (make_input(batch, size, torch.device("cpu"), torch.float32),), path,
                          dynamo=False, input_names=["images"], output_names=["logits"], opset_version=17)
    return path


def _onnxruntime_fn(path: str):
    import onnxruntime as ort

    # Default options but one: idle worker threads do not spin-wait after each run, which would take a core
    # from the next engine of the interleaved round (measured ~60 ms of a core on a 2-core machine).
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(x):
        return session.run(None, {"images": x})[0]

    run.session = session
    return run


def _openvino_fn(path: str, dtype: str):
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16" if dtype == "bfloat16" else "f32"}
    request = core.compile_model(core.read_model(path), "CPU", config).create_infer_request()

    def run(x):
        request.infer({0: x}, share_inputs=True)
        return request.get_output_tensor(0).data.copy()

    return run


def _peer_problem(source: str, device: torch.device, dtype: str) -> str:
    """Why the ONNX Runtime or OpenVINO peer cannot run here ("" when it can)."""
    if device.type != "cpu":
        return f"the {source} peer runs on the CPU (its CPU execution provider / plugin)"
    problem = _import_problem(source) or _import_problem("onnx")
    if problem:
        return problem + "; install with `pip install 'fastmvit[cpu]'`"
    if source == "onnxruntime" and dtype != "float32":
        return "ONNX Runtime's CPU provider has no float16/bfloat16 convolution kernels"
    if source == "openvino" and dtype != "float32":
        import openvino as ov

        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if dtype != "bfloat16" or "BF16" not in caps:
            return f"OpenVINO computes in {', '.join(caps)} on this CPU, not {dtype}"
    return ""


def _hf_segmentation_model(name: str) -> nn.Module:
    """Hugging Face's MobileViT[V2]ForSemanticSegmentation (output stride 16) with the reference weights."""
    import transformers as tr

    from ..segmentation import segmentation_variant
    from ..weights.segmentation import segmentation_from_canonical

    v = segmentation_variant(name)
    cls = tr.MobileViTForSemanticSegmentation if v.family == "v1" else tr.MobileViTV2ForSemanticSegmentation
    model = cls(_hf_config(v, num_labels=21, output_stride=16))
    model.load_state_dict(segmentation_from_canonical(reference_weights(name), v.name, "hf"))
    return model.eval()


class _HFLogits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


@dataclass
class Prepared:
    """A built engine: ``fn()`` runs one forward of the prepared input and returns the logits."""

    fn: Callable[[], torch.Tensor]
    x: torch.Tensor
    close: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Engine:
    """One way of running MobileViT.

    source: "fastmvit" (``fastmvit.load`` with the engine keywords), "torch" (fastmvit's plain-PyTorch
    path), "timm", "hf", or the peers "onnxruntime" and "openvino" (the torch path exported to ONNX, run
    with the runtime's CPU defaults, except that ONNX Runtime's threads do not spin-wait between runs;
    OpenVINO with the LATENCY hint and the row's dtype as its inference precision). Eager engines cast the model to the dtype unless ``autocast``, which keeps
    float32 weights and runs under ``torch.autocast``; ``channels_last`` converts model and input;
    ``compile_mode`` wraps the model in ``torch.compile``. ``warmup``: untimed calls it needs at least
    (compilation, CUDA-graph capture). ``opt_in``: run only when asked for by name or option."""

    name: str
    label: str
    source: str
    autocast: bool = False
    channels_last: bool = False
    compile_mode: Optional[str] = None
    backend: Optional[str] = None
    cuda_graphs: Optional[bool] = None
    warmup: int = 2
    opt_in: bool = False

    def check(self, device: torch.device, dtype: str) -> None:
        """Raise Unavailable when this engine cannot run on ``device`` in ``dtype``."""
        if self.autocast and dtype == "float32":
            raise Unavailable("autocast applies to float16/bfloat16 only")
        if self.source == "fastmvit" and self.cuda_graphs is False and device.type != "cuda":
            raise Unavailable("CUDA graphs exist only on CUDA; on the CPU this is the 'fastmvit' row")
        if self.source == "fastmvit" and self.backend in ("onnxruntime", "openvino"):
            if device.type != "cpu":
                raise Unavailable(f"fastmvit's {self.backend} engine runs on the CPU")
            from ..cpu import RUNTIMES, problem

            if problem(self.backend):
                raise Unavailable(problem(self.backend))
            if DTYPES[dtype] not in RUNTIMES[self.backend].supported_dtypes():
                raise Unavailable(f"fastmvit's {self.backend} engine does not compute in {dtype} on this CPU")
        if self.source in ("onnxruntime", "openvino"):
            problem = _peer_problem(self.source, device, dtype)
            if problem:
                raise Unavailable(problem)
        if self.source in ("timm", "hf"):
            problem = _import_problem("timm" if self.source == "timm" else "transformers")
            if problem:
                raise Unavailable(problem)
        if self.compile_mode == "reduce-overhead" and device.type != "cuda":
            raise Unavailable("mode='reduce-overhead' uses CUDA graphs: CUDA only")

    def runs_on(self, device: torch.device, dtype: str = "float32") -> Tuple[str, str]:
        """What this engine executes on ``device`` in ``dtype``: ``(kind, in words)``. kind is "fused
        engine", "CPU engine", "torch path", "timm", "HF transformers", "ONNX Runtime" or "OpenVINO"; the
        bench labels every row with it, so a row named "fastmvit" says what it runs on this device (on a CPU,
        fastmvit.engine.dispatch picks the CPU engine or the plain modules by dtype and installed runtimes)."""
        how = [w for w, on in (("channels-last", self.channels_last), ("autocast", self.autocast)) if on]
        if self.compile_mode is not None:
            how.insert(0, f"torch.compile mode={self.compile_mode}")
        if self.source == "fastmvit":
            from ..engine import CPU_AUTO, FUSED, TORCH, choose_engine

            if self.backend in PEERS and device.type != "cpu":
                return "CPU engine", f"CPU engine on {self.backend} (CPU tensors only)"
            which = choose_engine(self.backend or "auto", torch.empty(0, device=device, dtype=DTYPES[dtype]))
            if which == FUSED:
                if device.type == "cuda":
                    how.append("CUDA graphs" if self.cuda_graphs is not False else "no CUDA graphs")
                else:
                    how.append("Triton interpreter: for tests, not speed")
                return "fused engine", "fused engine: Triton kernels" + "".join(f", {w}" for w in how)
            if which == CPU_AUTO:
                from ..cpu import RUNTIMES, auto_runtimes

                runs = " or ".join(f"{PEERS[r]} {RUNTIMES[r].version()}" for r in auto_runtimes(DTYPES[dtype]))
                return "CPU engine", (f"CPU engine: fastmvit's graph exported to ONNX, run by {runs}, the faster "
                                      f"measured at the first build")
            if which != TORCH:
                from ..cpu import RUNTIMES

                return "CPU engine", (f"CPU engine: fastmvit's graph exported to ONNX, run by {PEERS[which]} "
                                      f"{RUNTIMES[which].version()}")
            why = ("the fused engine runs on CUDA tensors only; no CPU runtime computes in "
                   f"{dtype} here, or FASTMVIT_CPU_ENGINE=torch" if device.type == "cpu" else
                   f"no fused or CPU engine on {device.type}")
            return "torch path", f"torch path: fastmvit's plain PyTorch modules ({why})" + "".join(f", {w}" for w in how)
        if self.source in PEERS:
            return PEERS[self.source], f"{self.label}: the torch path exported to ONNX (static shape)"
        if self.source == "torch":
            return "torch path", "torch path: fastmvit's plain PyTorch modules" + "".join(f", {w}" for w in how)
        kind = {"timm": "timm", "hf": "HF transformers"}.get(self.source, self.source)
        return kind, f"{kind} eager" + "".join(f", {w}" for w in how)

    def computes_reference(self, device: torch.device) -> bool:
        """True when, in float32, this engine computes exactly what the benchmark's logits check compares
        with (fastmvit's float32 torch path): its max|dlogit| is then 0 by construction and checks nothing."""
        return (self.runs_on(device)[0] == "torch path" and not self.channels_last and not self.autocast
                and self.compile_mode is None)

    def build(self, variant: str, batch: int, dtype: str, device: torch.device, size: int = 256) -> Prepared:
        self.check(device, dtype)
        tdtype = DTYPES[dtype]
        if self.source in ("onnxruntime", "openvino"):
            path = exported_onnx(variant, batch, size)
            run = _onnxruntime_fn(path) if self.source == "onnxruntime" else _openvino_fn(path, dtype)
            x = make_input(batch, size, device, tdtype)
            # The peers take float32 numpy arrays; the conversion is part of what their users pay.
            return Prepared(lambda: torch.from_numpy(run(x.float().numpy())).to(tdtype), x)
        if self.source == "fastmvit":
            model = _fastmvit_model(variant, self.backend, self.cuda_graphs)
        elif self.source == "torch":
            model = _fastmvit_model(variant, "torch", None)
        elif self.source == "timm":
            model = _timm_model(variant)
        elif self.source == "hf":
            model = _HFLogits(hf_model(variant))
        else:
            raise ValueError(f"unknown engine source {self.source!r}")
        model = model.to(device=device, dtype=torch.float32 if self.autocast else tdtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        x = make_input(batch, size, device, torch.float32 if self.autocast else tdtype, self.channels_last)
        grad_off = torch.inference_mode
        close = lambda: None  # noqa: E731
        if self.compile_mode is not None:
            import torch._dynamo as dynamo

            # A fresh dynamo for each compiled engine: every MobileViT instance shares one forward code
            # object, and past its recompile limit dynamo would silently run eager.
            dynamo.reset()
            model = torch.compile(model, mode=None if self.compile_mode == "default" else self.compile_mode,
                                  dynamic=False)
            grad_off = torch.no_grad
            close = dynamo.reset
        amp = (functools.partial(torch.autocast, device.type, dtype=tdtype) if self.autocast
               else contextlib.nullcontext)

        def fn():
            with grad_off(), amp():
                return model(x)

        return Prepared(fn, x, close)


def _registry() -> List[Engine]:
    engines = [
        Engine("fastmvit", "fastmvit (fused kernels, CUDA graphs)", "fastmvit", backend="auto", cuda_graphs=True,
               warmup=3),
        Engine("fastmvit-nograph", "fastmvit (fused kernels, no CUDA graphs)", "fastmvit", backend="auto",
               cuda_graphs=False),
        Engine("fastmvit-onnxruntime", "fastmvit's CPU engine on ONNX Runtime", "fastmvit", backend="onnxruntime"),
        Engine("fastmvit-openvino", "fastmvit's CPU engine on OpenVINO", "fastmvit", backend="openvino"),
        # The runtimes a CPU user would pick instead, on the same weights (peers, not fastmvit's engine):
        Engine("onnxruntime", "ONNX Runtime (CPU provider, defaults, no spin-wait)", "onnxruntime"),
        Engine("openvino", "OpenVINO (CPU, LATENCY hint)", "openvino"),
    ]
    for src, what in (("torch", "eager PyTorch (fastmvit's torch path)"), ("timm", "timm eager"),
                      ("hf", "HF transformers eager")):
        engines += [
            Engine(f"{src}-eager", what, src),
            Engine(f"{src}-channels-last", f"{what}, channels-last", src, channels_last=True),
            Engine(f"{src}-autocast", f"{what}, autocast", src, autocast=True),
            Engine(f"{src}-autocast-cl", f"{what}, autocast, channels-last", src, autocast=True,
                   channels_last=True),
        ]
    engines += [
        Engine("compile", "torch.compile (default)", "torch", compile_mode="default", warmup=3),
        Engine("compile-reduce-overhead", "torch.compile (reduce-overhead: CUDA graphs)", "torch",
               compile_mode="reduce-overhead", warmup=5),
        Engine("compile-max-autotune", "torch.compile (max-autotune; compiles for minutes)", "torch",
               compile_mode="max-autotune", warmup=5, opt_in=True),
    ]
    return engines


ENGINES: Dict[str, Engine] = {e.name: e for e in _registry()}

# What runs when nothing is named: the README's quick comparison, and the pytest suites.
QUICK = {"cpu": ["fastmvit", "torch-eager", "onnxruntime", "openvino", "hf-eager", "timm-eager"],
         "cuda": ["fastmvit", "fastmvit-nograph", "torch-eager", "torch-autocast", "timm-eager", "hf-eager"]}
COMPILED = ["compile", "compile-reduce-overhead"]


def select(names: Optional[List[str]], device: torch.device, compiled: bool = False,
           max_autotune: bool = False) -> List[Engine]:
    """Engines by name (None: the quick set for the device, plus torch.compile if ``compiled``, plus
    max-autotune if ``max_autotune``). Unknown names raise OptionError (a ValueError) listing the valid ones."""
    if names is None:
        names = list(QUICK["cuda" if device.type == "cuda" else "cpu"])
        if compiled:
            names += COMPILED if device.type == "cuda" else ["compile"]
    names = list(names)
    if max_autotune and "compile-max-autotune" not in names:
        names.append("compile-max-autotune")
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise OptionError(f"unknown engine(s) {unknown}; known: {', '.join(ENGINES)}")
    return [ENGINES[n] for n in names]
