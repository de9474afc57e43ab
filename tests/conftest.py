"""Shared test set-up. On a machine without CUDA the Triton kernels run under the interpreter, which must
be chosen before any kernel module is imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as the engine sets it (fastmvit.engine.prepare_kernels)

# Every output a kernel launcher allocates starts as NaN (fastmvit.kernels._common.empty_output), so an
# element a kernel fails to write fails its test, in a kernel test or deep inside a whole model.
os.environ["FASTMVIT_POISON_OUTPUTS"] = "1"

# backend="auto" on CPU tensors runs the CPU engine (an ONNX export per model and size) when a runtime is
# installed. The suite's parity tests compare the plain PyTorch path exactly with each reference, so "auto"
# runs it here; tests/test_cpu_engine.py tests the CPU engine, and "auto" choosing it, on its own.
os.environ.setdefault("FASTMVIT_CPU_ENGINE", "torch")

# Tests must never reach the network (pretrained downloads are tested up to huggingface_hub's API).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.manual_seed(0)

from fastmvit.cpu.runtimes import cpu_count  # noqa: E402

# Every replayed launch plan is checked against its recording (same ops, same tensor layouts).
from fastmvit.engine.engine import Engine  # noqa: E402  (no kernels imported: they load with the first engine)

Engine.check_replays = True


# ---- Running the suite in parallel (pytest-xdist) --------------------------------------------------
# The whole suite (`python -m pytest tests -q`, what CI runs) is spread over two worker processes: most of
# its time is the Triton interpreter, pure Python on one core. A narrower run (a file, a test id, -k, -m)
# stays in one process, as does any run where pytest-xdist is not installed; an explicit -n N decides
# instead (-n 0: serial).
WORKERS = 2


def _workers(config) -> int:
    """WORKERS for a whole-directory run, 0 (serial) for a narrower one or on one CPU."""
    o = config.option
    if o.keyword or o.markexpr or o.collectonly or getattr(o, "usepdb", False) or o.maxfail:
        return 0
    if any("::" in a or not os.path.isdir(a) for a in config.args):
        return 0
    return min(WORKERS, cpu_count()) if cpu_count() > 1 else 0


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Before pytest-xdist reads its options: ask for the workers when -n was not given."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    if config.option.numprocesses is None and config.option.dist == "no":
        n = _workers(config)
        if n:
            config.option.numprocesses, config.option.dist = n, "loadgroup"


# In a worker, use a fair share of the CPUs: two processes of two threads each on two cores are many
# times slower than one thread each (they preempt each other inside every parallel op). The servers and
# command lines the tests start inherit OMP_NUM_THREADS.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, cpu_count() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_share)
    os.environ["OMP_NUM_THREADS"] = str(_share)


# Tests that share an expensive module-scoped fixture (a real server, the sm_90 compile of every kernel
# family's sample) run in one worker, so it runs once; every other test is handed to whichever worker is
# free. The scheduler below says so itself: pytest-xdist's loadgroup passes its groups by rewriting test
# ids, which pytest 9.2's structured ids ignore (pytest-xdist issue 1386), so its xdist_group marks
# silently stopped grouping and each of these modules started its fixture in both workers.
SHARED_FIXTURE_MODULES = ("test_litserve_server.py", "test_triton_server.py", "test_litserve_faults.py",
                          "test_triton_faults.py", "test_segmentation_servers.py", "test_kernel_compile.py")
# The modules whose tests take longest (whole models under the interpreter, compiling the CUDA binding,
# compiling kernels for sm_90): handed out first, so that the short tests fill in around them instead of
# one worker finishing alone.
LONG_MODULES = ("test_engine.py", "test_kernel_compile.py", "test_csrc.py")


def pytest_xdist_make_scheduler(config, log):
    """For --dist loadgroup (what the whole suite runs, above): a shared-fixture module is one unit of
    work, every other test its own."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerPerSharedModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if os.path.basename(module) in SHARED_FIXTURE_MODULES else nodeid

    return OneWorkerPerSharedModule(config, log)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts alike, a module's tests stay together
        items.sort(key=lambda item: item.path.name not in LONG_MODULES)


# timm imports torchvision, which has no build that loads with the CPU torch: make its pure-Python parts
# importable (tests/torchvision_standin.py; a no-op where a real torchvision loads).
from .torchvision_standin import install as _install_torchvision  # noqa: E402

TORCHVISION = _install_torchvision()


def pytest_report_header(config):
    return f"timm tests: {TORCHVISION}"


# Triton's interpreter can check every 32-bit integer add, sub and mul of a kernel for overflow (each one
# redone in 64 bits and compared). By default it does the arithmetic and drops the verdict: the check is
# InterpreterOptions.sanitize_overflow (on), its assertion fires only with InterpreterOptions.debug (off).
# The kernel tests (tests/kernels/: index arithmetic at awkward and large shapes) turn both on, so an
# overflowing offset fails there; the other tests run whole models at small sizes through the same kernels,
# where the check cannot fire and cost about a fifth of their time: both off.
KERNEL_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")


def _set_overflow_checks(on: bool):
    """Turn the interpreter's integer-overflow assertions on or off; returns the previous options (None
    where the kernels are not interpreted: nothing to change)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import dataclasses

    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    was = builder.options
    builder.options = dataclasses.replace(was, sanitize_overflow=on, debug=on)
    return was


def _patch_the_language_once_per_launch():
    """Triton's interpreter swaps triton.language's builtins for interpreted ones when a launch starts
    (and restores them when it ends), and again at every call of a @triton.jit helper inside the kernel,
    where everything is already swapped: each of those calls walks the modules' members with
    inspect.getmembers, about a fifth of a whole model's interpreted forward (the GEMM calls its helpers
    per K step). Here a helper call skips the walk when its thread's launch already swapped the modules
    the helper sees; the launch's own swap and restore are unchanged. Where Triton's internals differ
    (another version), nothing is changed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import threading

    import triton.language as tl
    from triton.runtime import interpreter as ti

    patch_lang, run_grid = getattr(ti, "_patch_lang", None), getattr(ti.GridExecutor, "__call__", None)
    scope_type = getattr(ti, "_LangPatchScope", None)
    if patch_lang is None or run_grid is None or scope_type is None:
        return
    state = threading.local()

    def langs_of(fn):
        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    def launch(self, *args, **kwargs):
        outer = getattr(state, "swapped", None)
        state.swapped = set()  # this launch's swap (GridExecutor.__call__ -> _patch_lang) fills it
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            state.swapped = outer

    def patch(fn):
        swapped, langs = getattr(state, "swapped", None), langs_of(fn)
        if swapped and langs <= swapped:
            return scope_type()  # already swapped by this launch: nothing to do, nothing to restore
        scope = patch_lang(fn)
        if swapped is not None:
            swapped |= langs
        return scope

    ti._patch_lang, ti.GridExecutor.__call__ = patch, launch


_patch_the_language_once_per_launch()


@pytest.fixture(autouse=True)
def _overflow_checks(request):
    was = _set_overflow_checks(str(request.node.path).startswith(KERNEL_TESTS + os.sep))
    yield
    if was is not None:
        from triton.runtime import interpreter

        interpreter.interpreter_builder.options = was


@pytest.fixture(autouse=True)
def _no_network_cache(tmp_path_factory, monkeypatch):
    """Point the fastmvit and Hugging Face caches at empty folders so no test finds a user's files."""
    import huggingface_hub.constants as hfc

    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("FASTMVIT_CACHE", str(root / "fastmvit"))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(root / "hf"))
