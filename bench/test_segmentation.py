"""Segmentation (MobileViT + DeepLabV3, output stride 16) at 512x512, as the published checkpoints run:
``pytest bench/ --benchmark-only -k segmentation``. The fastmvit row runs the plain PyTorch modules on every
device (no fused segmentation kernels yet), so it measures the torch path against HF's eager model."""
import pytest

from fastmvit.benchmark import engines as E

from bench_matrix import DEVICE, ON_GPU
from test_models import measure_point

SIZE = 512
MODELS = ["deeplabv3-s", "deeplabv3-v2-1.0"] if ON_GPU else ["deeplabv3-xxs", "deeplabv3-v2-0.5"]
DTYPES = ["float32", "float16"] if ON_GPU else ["float32"]
ENGINES = ["fastmvit", "torch-autocast", "hf-eager", "compile"] if ON_GPU else ["fastmvit", "hf-eager"]
POINTS = [(m, 1, d, e) for m in MODELS for d in DTYPES for e in ENGINES]


@pytest.mark.parametrize("point", POINTS, ids=[f"{m}-{SIZE}-b1-{E.DTYPE_SHORT[d]}-{e}" for m, _, d, e in POINTS])
def test_segmentation(benchmark, bench_run, point, request):
    measure_point(benchmark, bench_run, point, request, SIZE)
