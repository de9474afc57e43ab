"""The CUDA-graph runner. On the CPU its bookkeeping runs for real with stand-ins for capture, replay, streams
and events (cache keys, eviction, fallback, copies of outputs, grad modes, the memory budget, the stream
ordering, serialisation across threads); on a GPU the same contract with real graphs."""
import itertools
import threading
import time
import warnings

import pytest
import torch

from fastmvit.engine.graphs import GraphRunner

from .kernels.common import needs_gpu

GRAD_MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "plain": torch.enable_grad}


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_event(self, event):
        self.log.append(("wait", self.name, event.stream))

    def __repr__(self):
        return self.name


class FakeEvent:
    def __init__(self, log):
        self.log, self.stream = log, None

    def record(self, stream):
        self.stream = stream.name
        self.log.append(("record", stream.name))

    def synchronize(self):
        pass


class FakeGraphRunner(GraphRunner):
    """Captures on CPU tensors. A 'replay' recomputes fn from the static input after a pause, writing the
    static output below autograd as a graph does, so two replays interleaving on the same buffers would
    give wrong answers. The pool grows by what a batch needs beyond what it holds (``bytes_per_image``
    per image), against a budget of ``budget`` bytes. Streams and events log what the runner orders."""

    bytes_per_image = 100
    budget = 10 ** 9

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = []
        self.local = threading.local()

    def eligible(self, x):
        return self.max_batch is None or x.shape[0] <= self.max_batch

    def memory_budget(self, device):
        return self.budget

    def _current_stream(self, device):
        return getattr(self.local, "stream", None) or FakeStream("default", self.log)

    def _new_event(self):
        return FakeEvent(self.log)

    def _record(self, static_input):
        static_output = torch.empty_like(self.fn(static_input))

        def replay():
            self.log.append(("replay", self._current_stream(None).name))
            time.sleep(0.0005)
            with torch.inference_mode():  # a graph writes its buffers below autograd
                static_output.copy_(self.fn(static_input))

        need = self.bytes_per_image * static_input.shape[0]
        growth = max(0, need - self._pool_bytes.get(static_input.device, 0))
        return static_output, replay, growth


def _fn(x):
    return x * 2 + 1


def test_capture_once_per_signature_and_replay():
    runner = FakeGraphRunner(_fn, max_graphs=2)
    a, b = torch.rand(1, 3, 8, 8), torch.rand(2, 3, 8, 8)
    for x in (a, a + 1, b, a):
        torch.testing.assert_close(runner(x), _fn(x))
    assert runner.captures == 2 and len(runner) == 2
    runner(torch.rand(1, 3, 4, 4))               # a third signature evicts the least recently used (b)
    assert len(runner) == 2 and runner.captures == 3
    runner(b)
    assert runner.captures == 4


def test_dtype_is_part_of_the_signature():
    runner = FakeGraphRunner(_fn)
    runner(torch.rand(1, 3, 8, 8))
    out = runner(torch.rand(1, 3, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float64 and runner.captures == 2


def test_a_batch_limit_still_runs_larger_batches_directly():
    calls = []
    runner = FakeGraphRunner(lambda x: calls.append(x) or _fn(x), max_batch=4)
    runner(torch.rand(8, 3, 8, 8))
    assert runner.captures == 0 and len(calls) == 1
    with pytest.raises(ValueError, match="max_batch"):
        GraphRunner(_fn, max_batch=-1)


def test_outputs_are_copies():
    runner = FakeGraphRunner(_fn)
    first = runner(torch.zeros(1, 4))
    runner(torch.ones(1, 4))
    torch.testing.assert_close(first, torch.ones(1, 4))  # not overwritten by the second replay


def test_failed_capture_falls_back_and_is_remembered():
    class Failing(FakeGraphRunner):
        tries = 0

        def _record(self, static_input):
            Failing.tries += 1
            raise RuntimeError("operation not permitted when stream is capturing")

    runner = Failing(_fn)
    x = torch.rand(1, 4)
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        torch.testing.assert_close(runner(x), _fn(x))
    torch.testing.assert_close(runner(x), _fn(x))
    assert Failing.tries == 1


@pytest.mark.parametrize("modes", list(itertools.product(GRAD_MODES, repeat=3)), ids="-".join)
def test_every_mix_of_grad_modes(modes):
    """Capture in one grad mode, replay in the others: the static input must stay writable (it was an
    inference tensor when the capture ran under inference_mode), and each result is what an eager call
    in that mode returns (an inference tensor only under inference_mode)."""
    runner = FakeGraphRunner(_fn)
    for i, mode in enumerate(modes):
        x = torch.full((2, 4), float(i))
        with GRAD_MODES[mode]():
            out = runner(x)
        torch.testing.assert_close(out, _fn(x))
        assert out.is_inference() == (mode == "inference_mode"), (i, mode)
        assert not out.requires_grad
    assert runner.captures == 1


def test_replays_are_ordered_across_streams():
    """Two threads on their own streams: each replay waits, on its own stream, for the event recorded
    after the previous replay's output copy on the other stream, so one never overwrites the static
    buffers or the shared pool while the other still reads them."""
    runner = FakeGraphRunner(_fn)
    x = torch.rand(1, 4)
    runner(x)                                   # capture (and a first replay) on the default stream
    runner.log.clear()

    def call_on(name):
        runner.local.stream = FakeStream(name, runner.log)
        runner(x)

    for name in ("a", "b"):
        t = threading.Thread(target=call_on, args=(name,))
        t.start()
        t.join()
    assert runner.log == [("wait", "a", "default"), ("replay", "a"), ("record", "a"),
                          ("wait", "b", "a"), ("replay", "b"), ("record", "b")]


def test_memory_decides_which_batches_get_a_graph():
    runner = FakeGraphRunner(_fn)
    runner.budget = 1000                        # 10 images of 100 bytes
    for batch in (2, 8):
        runner(torch.rand(batch, 4))
    assert runner.captures == 2 and runner.pool_bytes("cpu") == 800  # the pool holds the larger batch
    x = torch.rand(16, 4)
    torch.testing.assert_close(runner(x), _fn(x))  # predicted 1600 bytes: runs without a graph
    assert runner.captures == 2 and len(runner) == 2
    runner(torch.rand(10, 4))                   # exactly the budget
    assert runner.captures == 3


def test_a_capture_over_the_budget_drops_the_pool_and_is_not_retried():
    runner = FakeGraphRunner(_fn)
    runner.budget = 1000
    runner(torch.rand(4, 4))
    assert len(runner) == 1
    big = torch.rand(20, 3)                     # an image size never seen: tried, measured, too large
    torch.testing.assert_close(runner(big), _fn(big))
    assert runner.captures == 2 and len(runner) == 0 and runner.pool_bytes("cpu") == 0
    runner(torch.rand(30, 3))                   # a larger batch of that size is not even tried
    runner(torch.rand(4, 4))                    # a new pool for what fits
    assert runner.captures == 3 and len(runner) == 1


def test_threads_get_their_own_answers():
    runner = FakeGraphRunner(_fn)
    shapes = [(1, 3, 8, 8), (2, 3, 8, 8), (1, 3, 16, 8)]
    errors = []

    def worker(seed):
        g = torch.Generator().manual_seed(seed)
        modes = list(GRAD_MODES.values())
        for i in range(30):
            x = torch.rand(shapes[(seed + i) % 3], generator=g)
            with modes[(seed + i) % 3]():
                if not torch.equal(runner(x), _fn(x)):
                    errors.append((seed, i))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and runner.captures == 3


# -- on a GPU ---------------------------------------------------------------------------------------

def _layer():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU()).cuda().eval().requires_grad_(False)


@needs_gpu
def test_real_capture_matches_eager_across_shapes():
    layer = _layer()
    runner = GraphRunner(layer)
    with torch.no_grad():
        for shape in [(1, 3, 32, 32), (4, 3, 32, 32), (1, 3, 32, 32), (2, 3, 16, 24), (512, 3, 32, 32)]:
            x = torch.rand(shape, device="cuda")
            torch.testing.assert_close(runner(x), layer(x))
    assert runner.captures == 4 and runner.pool_bytes("cuda") > 0


@needs_gpu
@pytest.mark.parametrize("first", list(GRAD_MODES))
def test_real_replays_across_grad_modes(first):
    layer = _layer()
    runner = GraphRunner(layer)
    for mode in [first, *GRAD_MODES]:
        x = torch.rand(2, 3, 16, 16, device="cuda")
        with GRAD_MODES[mode]():
            out = runner(x)
        with torch.no_grad():
            torch.testing.assert_close(out, layer(x))
        assert out.is_inference() == (mode == "inference_mode")
    assert runner.captures == 1


@needs_gpu
def test_real_replays_honour_the_callers_stream():
    """The input is produced on a side stream by a long kernel and never synchronised: a runner that
    worked on another stream would read it half-written."""
    layer = _layer()
    runner = GraphRunner(layer)
    side = torch.cuda.Stream()
    big = torch.rand(4096, 4096, device="cuda")
    with torch.no_grad():
        for i in range(4):
            torch.cuda.synchronize()
            with torch.cuda.stream(side):
                slow = (big @ big).sum() * 0          # keeps the stream busy before x is written
                x = torch.full((2, 3, 32, 32), float(i), device="cuda") + slow
                out = runner(x)
            side.synchronize()
            torch.testing.assert_close(out, layer(torch.full((2, 3, 32, 32), float(i), device="cuda")))


@needs_gpu
def test_real_replays_from_threads_on_their_own_streams():
    layer = _layer()
    runner = GraphRunner(layer)
    errors = []

    def worker(seed):
        stream = torch.cuda.Stream()
        g = torch.Generator(device="cuda").manual_seed(seed)
        with torch.cuda.stream(stream), torch.no_grad():
            for i in range(40):
                x = torch.rand((1 + (seed + i) % 2, 3, 64, 64), device="cuda", generator=g)
                out = runner(x)
                if (out - layer(x)).abs().max().item() > 1e-5:
                    errors.append((seed, i))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and runner.captures == 2


@needs_gpu
def test_eager_work_in_another_thread_does_not_break_a_capture():
    """With capture_error_mode="global" another thread's cudaMalloc/cudaFree or synchronisation during a
    capture invalidates it (the runner would warn and fall back to eager) and fails in that thread."""
    layer = _layer()
    stop = threading.Event()
    eager_errors = []

    def eager():
        try:
            while not stop.is_set():
                torch.empty((1 << 20) + int(time.time() * 1e6) % 4096, device="cuda").fill_(1)
                torch.cuda.empty_cache()
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001  (reported by the assertion below)
            eager_errors.append(repr(e))

    thread = threading.Thread(target=eager)
    thread.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            runner = GraphRunner(layer)
            with torch.no_grad():
                for b in range(1, 9):
                    runner(torch.rand(b, 3, 32, 32, device="cuda"))
    finally:
        stop.set()
        thread.join()
    assert not eager_errors
    assert runner.captures == 8


@needs_gpu
def test_a_graph_over_the_memory_budget_is_dropped():
    layer = _layer()
    runner = GraphRunner(layer, memory_fraction=1e-9)
    x = torch.rand(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(runner(x), layer(x))
        torch.testing.assert_close(runner(x), layer(x))
    assert runner.captures == 1 and len(runner) == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_inputs_device_whatever_device_is_current():
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(3, 8, 3, padding=1).to("cuda:1").eval().requires_grad_(False)
    seen = []
    runner = GraphRunner(lambda x: seen.append(torch.cuda.current_device()) or layer(x))
    x = torch.rand(2, 3, 16, 16, device="cuda:1")
    with torch.cuda.device(0), torch.no_grad():
        out = runner(x)
        assert torch.cuda.current_device() == 0
    torch.testing.assert_close(out, layer(x))
    assert set(seen) == {1}
