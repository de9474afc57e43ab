"""fastmvit's build: a pure-Python package plus an optional CUDA C++ extension (``fastmvit._C``).

The extension is built only when torch is importable at build time (``pip install --no-build-isolation``),
is a CUDA build, and a CUDA toolkit (nvcc) is found. Otherwise the install goes on without it and says
why; fastmvit then uses its Triton kernels alone.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"fastmvit setup: {msg}", file=sys.stderr)


def cuda_extension():
    """Return ([extension], {"build_ext": ...}) or ([], {}) with a message saying what was skipped."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if os.environ.get("FASTMVIT_NO_EXTENSION"):
        _log("FASTMVIT_NO_EXTENSION is set: skipping the CUDA extension")
        return [], {}
    if not sources:
        _log("no sources in csrc/: skipping the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _log("torch is not importable at build time (isolated build?): skipping the CUDA extension; "
             "install with `pip install --no-build-isolation .` to build it")
        return [], {}
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} is a CPU build: skipping the CUDA extension")
        return [], {}
    if CUDA_HOME is None:
        _log("no CUDA toolkit found (nvcc, CUDA_HOME): skipping the CUDA extension")
        return [], {}
    if not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        # torch guesses CUDA_HOME from the first nvcc on PATH; a wrapper script there gives a wrong root
        _log(f"the CUDA toolkit found at {CUDA_HOME} has no include/cuda_runtime.h: skipping the CUDA extension; "
             f"set CUDA_HOME to the toolkit's root (e.g. /usr/local/cuda-13.0) to build it")
        return [], {}
    from torch.utils.cpp_extension import is_ninja_available

    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    ninja = is_ninja_available()
    _log(f"building the CUDA extension with {CUDA_HOME} for {arch or 'the visible GPUs / torch defaults'}, "
         + ("with ninja (parallel)" if ninja else "without ninja (one file at a time; `pip install ninja` "
                                                 "for a parallel build)"))
    # No -std flag: BuildExtension adds the C++ standard this torch is built with (C++20 from torch 2.13 on,
    # C++17 before); forcing another one mixes standards across the torch headers and the extension.
    ext = CUDAExtension(
        "fastmvit._C",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=ninja)}


if __name__ == "__main__":  # setuptools runs this file as __main__; the tests import cuda_extension()
    ext_modules, cmdclass = cuda_extension()
    setup(
        name="fastmvit",
        version="0.1.0",
        description="Fast MobileViT / MobileViTv2 inference: fused Triton and CUDA kernels, every checkpoint format",
        long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        license="Apache-2.0",
        python_requires=">=3.9",
        packages=find_packages(include=["fastmvit", "fastmvit.*"]) + ["fastmvit.kernels"],
        # The Triton kernels live at the top of the repository and install inside the package.
        package_dir={"fastmvit.kernels": "kernels"},
        package_data={"fastmvit": ["data/*.tsv"]},
        install_requires=[
            "torch>=2.4",
            "triton>=3.2; platform_system == 'Linux'",
            "numpy>=1.24",
            "safetensors>=0.4",
            "huggingface_hub>=0.23",
            "pillow>=9.0",
        ],
        extras_require={
            # transformers: the reference model of the parity tests; matplotlib: the report's plots are tested;
            # pyyaml: timm's own dependency (timm itself goes in with --no-deps: .ci/setup_timm.sh)
            "test": ["pytest>=7", "pytest-xdist>=3.5", "pytest-benchmark>=4", "transformers>=4.40", "matplotlib>=3.7",
                     "pyyaml>=5.1"],
            "bench": ["pytest-benchmark>=4", "matplotlib>=3.7", "tqdm>=4.60", "transformers>=4.40"],
            "serve": ["litserve>=0.2.19,<0.3", "tritonclient[http,grpc]>=2.40", "prometheus-client>=0.17"],
            # offline jobs: a progress bar on a terminal; Ray Data to run them on a cluster (`predict --ray`)
            "offline": ["tqdm>=4.60"],
            "ray": ["tqdm>=4.60", "ray[data]>=2.40"],
            # the CPU engine (fastmvit.cpu): the model exported to ONNX, run by OpenVINO or ONNX Runtime
            "cpu": ["onnx>=1.16", "onnxruntime>=1.18", "openvino>=2024.4"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        entry_points={"console_scripts": ["fastmvit=fastmvit.__main__:main"]},
    )
