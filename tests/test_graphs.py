"""The CUDA-graph runner's bookkeeping, on the CPU with a stand-in for capture and replay (what a CPU can
check: cache keys, eviction, fallback, copies of outputs, and serialisation across threads); and real
capture on a GPU."""
import threading
import time

import pytest
import torch

from fastmvit.engine.graphs import GraphRunner, _Captured

from .kernels.common import needs_gpu


class FakeGraphRunner(GraphRunner):
    """Captures on CPU tensors; a 'replay' recomputes fn from the static input after a pause, so two
    replays interleaving on the same buffers would give wrong answers."""

    def eligible(self, x):
        return x.shape[0] <= self.max_batch

    def _capture(self, x):
        static_input = x.clone()
        static_output = torch.empty_like(self.fn(static_input))

        def replay():
            time.sleep(0.0005)
            static_output.copy_(self.fn(static_input))

        return _Captured(static_input, static_output, replay)


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


def test_large_batches_run_directly():
    calls = []
    runner = FakeGraphRunner(lambda x: calls.append(x) or _fn(x), max_batch=4)
    runner(torch.rand(8, 3, 8, 8))
    assert runner.captures == 0 and len(calls) == 1


def test_outputs_are_copies():
    runner = FakeGraphRunner(_fn)
    first = runner(torch.zeros(1, 4))
    runner(torch.ones(1, 4))
    torch.testing.assert_close(first, torch.ones(1, 4))  # not overwritten by the second replay


def test_failed_capture_falls_back_and_is_remembered():
    class Failing(FakeGraphRunner):
        tries = 0

        def _capture(self, x):
            Failing.tries += 1
            raise RuntimeError("operation not permitted when stream is capturing")

    runner = Failing(_fn)
    x = torch.rand(1, 4)
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        torch.testing.assert_close(runner(x), _fn(x))
    torch.testing.assert_close(runner(x), _fn(x))
    assert Failing.tries == 1


def test_threads_get_their_own_answers():
    runner = FakeGraphRunner(_fn)
    shapes = [(1, 3, 8, 8), (2, 3, 8, 8), (1, 3, 16, 8)]
    errors = []

    def worker(seed):
        g = torch.Generator().manual_seed(seed)
        for i in range(30):
            x = torch.rand(shapes[(seed + i) % 3], generator=g)
            if not torch.equal(runner(x), _fn(x)):
                errors.append((seed, i))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and runner.captures == 3


@needs_gpu
def test_real_capture_matches_eager_across_shapes():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU()).cuda().eval()
    runner = GraphRunner(layer)
    with torch.no_grad():
        for shape in [(1, 3, 32, 32), (4, 3, 32, 32), (1, 3, 32, 32), (2, 3, 16, 24)]:
            x = torch.rand(shape, device="cuda")
            torch.testing.assert_close(runner(x), layer(x))
    assert runner.captures == 3
