"""csrc/: the CUDA C++ depthwise kernel and its pybind11 binding.

Without a GPU (CI): nvcc compiles csrc/dwconv.cu for sm_90 with no spills and 16-byte accesses; the
kernel's per-thread code runs on the CPU through csrc/testing/dwconv_host.cpp against the PyTorch
reference; bindings.cpp passes a syntax-only compile against torch's headers. With a GPU and a built
fastmvit._C: the real op against the reference. Each part skips when its tool is missing.
"""
import ctypes
import inspect
import os
import re
import runpy
import subprocess
import sys
import sysconfig

import pytest
import torch

from fastmvit.ops import cuda_ext
from fastmvit.ops.dwconv import dwconv3x3_reference, pack_dwconv3x3

from .kernels.common import assert_within_torch_error, dtype_id, poison

NVCC = cuda_ext.nvcc_path()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
needs_sources = pytest.mark.skipif(not os.path.isdir(cuda_ext.CSRC), reason="no csrc/ (not a source checkout)")
needs_extension = pytest.mark.skipif(not (cuda_ext.available() and torch.cuda.is_available()),
                                     reason="fastmvit._C not built or no CUDA device")
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# --------------------------------------------------------------------------------------------------
# compile checks
# --------------------------------------------------------------------------------------------------

@needs_nvcc
@needs_sources
def test_nvcc_sm90_no_spills():
    """All 24 instantiations (3 dtypes x 16-byte/scalar x stride 1/2 x dilation 1/2) compile for sm_90,
    none spills, and the 16-byte ones really use 128-bit loads and stores."""
    kernels = cuda_ext.nvcc_check(arch="sm_90")
    assert len(kernels) == 24, [k.name for k in kernels]
    for k in kernels:
        assert not k.spills, k
        assert k.registers <= 128, k  # 256 threads/block x 128 registers: 2 blocks per SM at least
        if "vec=1," not in k.name and k.ldg128 >= 0:
            assert k.ldg128 > 0 and k.stg128 > 0, k


def torch_cxx_standard() -> str:
    """The C++ standard torch's BuildExtension gives a build of this torch (it adds it when setup.py
    gives none): the -std flag its source names most."""
    import torch.utils.cpp_extension as cpp

    found = re.findall(r"-std=(c\+\+\d+)", inspect.getsource(cpp))
    return max(set(found), key=found.count) if found else "c++17"


@needs_nvcc
@needs_sources
def test_binding_compiles(tmp_path):
    """bindings.cpp against this torch's headers, in the C++ standard a build with this torch uses, syntax
    only (linking needs a CUDA build of torch).
    A CPU wheel lacks one generated header of the CUDA build, written here as the build generates it."""
    from torch.utils.cpp_extension import include_paths

    tmp = str(tmp_path)
    stub = os.path.join(tmp, "c10", "cuda", "impl")
    os.makedirs(stub, exist_ok=True)
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in include_paths()):
        with open(os.path.join(stub, "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [NVCC, "-x", "c++", f"-std={torch_cxx_standard()}", "-c", "-o", os.devnull, "-Xcompiler", "-fsyntax-only",
           "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *[f"-I{p}" for p in include_paths()], f"-I{tmp}", f"-I{sysconfig.get_paths()['include']}",
           os.path.join(cuda_ext.CSRC, "bindings.cpp")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]


@pytest.fixture
def setup_py(monkeypatch, tmp_path):
    """setup.py's cuda_extension() under a pretend CUDA build of torch with its toolkit at tmp_path."""
    import torch.utils.cpp_extension as cpp

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    if not os.path.isfile(root):
        pytest.skip("no setup.py (not a source checkout)")
    monkeypatch.chdir(os.path.dirname(root))
    monkeypatch.delenv("FASTMVIT_NO_EXTENSION", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp, "CUDA_HOME", str(tmp_path))
    return runpy.run_path(root, run_name="setup_under_test")["cuda_extension"]


def test_setup_skips_a_toolkit_without_headers_and_says_why(setup_py, capsys):
    assert setup_py() == ([], {})
    assert "no include/cuda_runtime.h" in capsys.readouterr().err


@needs_sources
def test_setup_lets_torch_choose_the_cxx_standard_and_uses_ninja(setup_py, tmp_path, capsys, monkeypatch):
    import torch.utils.cpp_extension as cpp
    from setuptools.dist import Distribution

    os.makedirs(tmp_path / "include")
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    for ninja in (True, False):
        monkeypatch.setattr(cpp, "is_ninja_available", lambda: ninja)
        (ext,), cmdclass = setup_py()
        flags = ext.extra_compile_args["cxx"] + ext.extra_compile_args["nvcc"]
        assert not [f for f in flags if f.startswith("-std")], flags   # BuildExtension adds torch's own
        assert cmdclass["build_ext"](Distribution()).use_ninja is ninja
        assert ("with ninja" if ninja else "without ninja") in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# the kernel's thread code, executed on the CPU
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory):
    """csrc/testing/dwconv_host.cpp built with nvcc driving the host compiler (it adds the CUDA headers)."""
    if NVCC is None or not os.path.isdir(cuda_ext.CSRC):
        pytest.skip("nvcc or csrc/ not found")
    lib = str(tmp_path_factory.mktemp("csrc") / "dwconv_host.so")
    cmd = [NVCC, "-x", "c++", "-std=c++17", "-O1", "-shared", "-Xcompiler", "-fPIC,-fno-strict-aliasing",
           *[f for f in cuda_ext.NVCC_FLAGS if f.startswith("-D")], "-o", lib,
           os.path.join(cuda_ext.CSRC, "testing", "dwconv_host.cpp")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    fn = ctypes.CDLL(lib).fastmvit_dwconv3x3_host
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 9
    return fn


# (B, H, W, C, stride, dilation, dtype, vector width): 16-byte and scalar kernels, odd/non-square maps,
# output widths that leave a partial 4-pixel group (OW = 6, 9, 1), C = 129 / 20 for the scalar path.
HOST_CASES = [
    (2, 7, 9, 24, 1, 1, torch.float32, 4),
    (1, 9, 7, 36, 2, 2, torch.float32, 4),
    (1, 7, 9, 129, 2, 1, torch.float32, 1),
    (2, 7, 9, 24, 1, 2, torch.float16, 8),
    (1, 1, 1, 16, 2, 1, torch.float16, 8),
    (1, 5, 11, 32, 2, 1, torch.float16, 8),
    (2, 3, 3, 129, 2, 2, torch.float16, 1),
    (1, 2, 3, 40, 1, 1, torch.float16, 1),
    (2, 5, 6, 48, 1, 1, torch.bfloat16, 8),
    (1, 4, 4, 20, 2, 1, torch.bfloat16, 1),
]


def host_id(c):
    B, H, W, C, s, d, dt, vec = c
    return f"B{B}-H{H}W{W}-C{C}-s{s}-d{d}-{dtype_id(dt)}-vec{vec}"


@pytest.mark.parametrize("act", [True, False], ids=["silu", "noact"])
@pytest.mark.parametrize("case", HOST_CASES, ids=host_id)
def test_kernel_thread_code_on_cpu(host_kernel, case, act):
    B, H, W, C, stride, dil, dtype, vec = case
    g = torch.Generator().manual_seed(C)
    x = torch.randn(B, H, W, C, generator=g).to(dtype)
    w, b = pack_dwconv3x3(torch.randn(C, 1, 3, 3, generator=g) / 3, torch.randn(C, generator=g) * 0.1)
    y = poison(torch.empty(B, (H - 1) // stride + 1, (W - 1) // stride + 1, C, dtype=dtype))
    rc = host_kernel(x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), B, H, W, C, stride, dil, int(act),
                     CODES[dtype], vec)
    assert rc == 0
    kw = dict(stride=stride, dilation=dil, act=act)
    ref64 = dwconv3x3_reference(x.double(), w.double(), b.double(), **kw)
    assert_within_torch_error(y, ref64, dwconv3x3_reference(x, w, b, **kw), host_id(case))


# --------------------------------------------------------------------------------------------------
# the Python side
# --------------------------------------------------------------------------------------------------

def test_status_and_fake_registration():
    """Importing cuda_ext never fails; the status says what happened; the op has a fake (meta) kernel, so
    torch.compile can trace it even where it cannot run."""
    assert isinstance(cuda_ext.extension_status(), str) and cuda_ext.extension_status()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.fastmvit.dwconv3x3_cuda(torch.empty(2, 7, 9, 16), torch.empty(9, 16), torch.empty(16), 2, 1,
                                              True)
    assert tuple(y.shape) == (2, 4, 5, 16)


@pytest.mark.skipif(cuda_ext.available(), reason="the extension is built here")
def test_missing_extension_raises_clearly():
    assert "not built" in cuda_ext.extension_status()
    x = torch.randn(1, 3, 3, 16)
    w, b = pack_dwconv3x3(torch.randn(16, 1, 3, 3), torch.randn(16))
    with pytest.raises(RuntimeError, match="needs the CUDA extension"):
        cuda_ext.dwconv3x3_cuda(x, w, b)


def test_import_does_not_initialise_cuda():
    # is_initialized() alone is always False on a CPU build: record attempts (tests/test_model.py does too)
    code = ("import torch; tried, lazy_init = [], torch.cuda._lazy_init\n"
            "torch.cuda._lazy_init = lambda: tried.append(1) or lazy_init()\n"
            "import fastmvit.ops.cuda_ext\n"
            "assert not tried and not torch.cuda.is_initialized(), 'CUDA initialised'")
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", [(2, 7, 9, 24, 1, 1), (1, 9, 7, 129, 2, 2), (8, 64, 64, 256, 2, 1),
                                   (4, 33, 31, 1024, 1, 2), (1, 1, 1, 16, 1, 1)],
                         ids=lambda s: "B{}-H{}W{}-C{}-s{}-d{}".format(*s))
def test_extension_on_gpu(shape, dtype):
    B, H, W, C, stride, dil = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, H, W, C, generator=g).to("cuda", dtype)
    w, b = (t.cuda() for t in pack_dwconv3x3(torch.randn(C, 1, 3, 3, generator=g) / 3, torch.randn(C, generator=g)))
    y = poison(torch.empty(B, (H - 1) // stride + 1, (W - 1) // stride + 1, C, device="cuda", dtype=dtype))
    cuda_ext._C.dwconv3x3_out(x, w, b, y, stride, dil, True)
    kw = dict(stride=stride, dilation=dil, act=True)
    ref64 = dwconv3x3_reference(x.double(), w.double(), b.double(), **kw)
    assert_within_torch_error(y, ref64, dwconv3x3_reference(x, w, b, **kw), "fastmvit._C")
    torch.testing.assert_close(cuda_ext.dwconv3x3_cuda(x, w, b, **kw), y, rtol=0, atol=0)


@needs_extension
def test_extension_opcheck_and_errors():
    x = torch.randn(2, 5, 6, 32, device="cuda", dtype=torch.float16)
    w, b = (t.cuda() for t in pack_dwconv3x3(torch.randn(32, 1, 3, 3), torch.randn(32)))
    torch.library.opcheck(torch.ops.fastmvit.dwconv3x3_cuda.default, (x, w, b, 1, 1, True))
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        cuda_ext._C.dwconv3x3(x.cpu(), w, b, 1, 1, True)
    with pytest.raises(RuntimeError, match="contiguous"):
        cuda_ext._C.dwconv3x3(x.transpose(1, 2), w, b, 1, 1, True)
    with pytest.raises(RuntimeError, match="float32"):
        cuda_ext._C.dwconv3x3(x, w.half(), b, 1, 1, True)
