"""Is OpenVINO's static-shape snippets bug still there, and does the CPU engine's exported form avoid it?

    python bench/openvino_snippets_check.py

OpenVINO's snippets (its JIT-fused subgraphs, on by default and used by static-shape builds) compute v1's
attention wrongly for short sequences when its q|k|v projection is one packed linear followed by reshape,
permute and unbind: the graph the torch path traces. fastmvit's CPU engine exports three linears instead
(``fastmvit.cpu.export.graph_form``). For a few v1 variants and sizes, on random image-sensitive weights,
this prints the error of a static build (batch 2, float32) as a fraction of the largest logit of the torch
path: packed form with snippets on and off, exported form with snippets on.

Measured with OpenVINO 2026.4.1 on a 2-core AMX Xeon (2026-12-07): packed with snippets, xxs 64x64 1.9e-2, xs
64x64 7.4e-2, s 64x64 3.4e-2, s 128x128 9.8e-3, xxs 96x96 1.0e-2, s 256x256 8.9e-7; packed without snippets
and the exported form with them, at most 3.5e-6 everywhere. When the packed form is exact with snippets too, a
newer OpenVINO fixed it.
"""
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: fastmvit and tests.utils
import fastmvit  # noqa: E402
from fastmvit.cpu.export import OPSET, _ReferenceForward, graph_form  # noqa: E402
from tests.utils import image_sensitive_  # noqa: E402  (weights whose logits depend on the image)


def _export(module, size: int, path: str) -> str:
    with torch.no_grad():
        torch.onnx.export(_ReferenceForward(module), (torch.zeros(2, 3, size, size),), path, dynamo=False,
                          opset_version=OPSET)
    return path


def main() -> None:
    import tempfile

    import openvino as ov

    warnings.simplefilter("ignore")  # the exporter's tracer notes
    core = ov.Core()
    tmp = tempfile.mkdtemp(prefix="fastmvit-snippets-")
    print(f"OpenVINO {ov.__version__}: static build (batch 2, float32), error / largest logit")
    for name, size in [("xxs", 64), ("xs", 64), ("s", 64), ("s", 128), ("xxs", 96), ("s", 256)]:
        model = image_sensitive_(fastmvit.load(name, pretrained=False, backend="torch"), size=size, seed=3)
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = model(x).numpy()
        forms = {"packed": _export(model, size, f"{tmp}/packed.onnx"),
                 "exported": _export(graph_form(model), size, f"{tmp}/exported.onnx")}
        errors = {}
        for form, mode in (("packed", "ENABLE"), ("packed", "DISABLE"), ("exported", "ENABLE")):
            graph = core.read_model(forms[form])
            graph.reshape([2, 3, size, size])
            config = {"INFERENCE_PRECISION_HINT": "f32", "SNIPPETS_MODE": mode}
            out = core.compile_model(graph, "CPU", config)(x.numpy())[0]
            label = f"{form}, snippets {'on' if mode == 'ENABLE' else 'off'}"
            errors[label] = np.abs(out - ref).max() / np.abs(ref).max()
        print(f"{name:4s} {size:3d}x{size:<3d} " + "  ".join(f"{k} {v:.1e}" for k, v in errors.items()))


if __name__ == "__main__":
    main()
