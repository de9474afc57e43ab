"""Is OpenVINO's static-shape snippets bug still there? (The CPU engine turns snippets off for its static
builds because of it: fastmvit.cpu.runtimes.OpenVino.)

    python bench/openvino_snippets_check.py

For a few MobileViT v1 variants and sizes, on random image-sensitive weights: the error of OpenVINO's static
build (batch 2), snippets on and off, float32, as a fraction of the largest logit of fastmvit's torch path.
Measured by this script with OpenVINO 2026.4.1 on a 2-core AMX Xeon (2026-12-07): snippets on, xxs 64x64
1.9e-2, xs 64x64 7.4e-2, s 64x64 3.4e-2, s 128x128 9.8e-3, xxs 96x96 1.0e-2, s 256x256 8.9e-7; snippets off,
all at most 2.9e-6. When every "on" error is as small as "off", a newer OpenVINO fixed it and the static
builds may turn snippets back on (measured then: 3-5% faster for S in bfloat16 at 256x256, no difference in
float32).
"""
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: fastmvit and tests.utils
import fastmvit  # noqa: E402
from fastmvit.cpu.export import exported_onnx, weights_fingerprint  # noqa: E402
from tests.utils import image_sensitive_  # noqa: E402  (weights whose logits depend on the image)


def main() -> None:
    import openvino as ov

    warnings.simplefilter("ignore")  # the exporter's tracer notes
    core = ov.Core()
    print(f"OpenVINO {ov.__version__}: error of the static build / largest logit, float32, batch 2")
    for name, size in [("xxs", 64), ("xs", 64), ("s", 64), ("s", 128), ("xxs", 96), ("s", 256)]:
        model = image_sensitive_(fastmvit.load(name, pretrained=False, backend="torch"), size=size, seed=3)
        path = exported_onnx(model, weights_fingerprint(model), (size, size))
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = model(x).numpy()
        errors = []
        for mode in ("ENABLE", "DISABLE"):
            graph = core.read_model(path)
            graph.reshape([2, 3, size, size])
            config = {"INFERENCE_PRECISION_HINT": "f32", "SNIPPETS_MODE": mode}
            out = core.compile_model(graph, "CPU", config)(x.numpy())[0]
            errors.append(float(np.abs(out - ref).max() / np.abs(ref).max()))
        print(f"{name:4s} {size:3d}x{size:<3d}  snippets on {errors[0]:.1e}  off {errors[1]:.1e}")


if __name__ == "__main__":
    main()
