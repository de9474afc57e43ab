"""The failure policy both plug-ins share (fastmvit/serving/faults.py), without a server: out-of-memory
splitting, which errors poison a worker, the statuses, the restart back-off and the test hook."""
import pytest
import torch

from fastmvit.serving.faults import (InjectedFaults, ServingLimits, forward_with_retries, is_device_fault,
                                     is_out_of_memory, refusal_for)


class FakeModel:
    """Row i of the output is 10 * (the image's value); records the size of every call."""

    def __init__(self, oom_above=None, oom_on_value=None, error=None):
        self.calls, self.oom_above, self.oom_on_value, self.error = [], oom_above, oom_on_value, error

    def __call__(self, x):
        self.calls.append(x.shape[0])
        if self.error is not None:
            raise self.error
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.oom_on_value is not None and (x == self.oom_on_value).any():
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return x * 10


def test_out_of_memory_splits_until_it_fits():
    model, released = FakeModel(oom_above=2), []
    x = torch.arange(7.0)[:, None]
    rows = forward_with_retries(model, x, release=lambda: released.append(1))
    assert torch.equal(torch.stack(rows), x * 10)
    assert model.calls == [7, 4, 2, 2, 3, 2, 1]  # 7 -> 4 + 3 -> (2 + 2) + (2 + 1)
    assert len(released) == 3  # the cache is emptied before each retry


def test_an_image_that_never_fits_fails_alone():
    model = FakeModel(oom_on_value=3.0)
    x = torch.arange(6.0)[:, None]
    rows = forward_with_retries(model, x)
    assert [isinstance(r, BaseException) for r in rows] == [False, False, False, True, False, False]
    assert torch.equal(torch.stack([r for i, r in enumerate(rows) if i != 3]), x[[0, 1, 2, 4, 5]] * 10)
    assert is_out_of_memory(rows[3]) and refusal_for(rows[3]).status == 503 and refusal_for(rows[3]).retry


def test_device_fault_is_not_retried():
    error = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    model = FakeModel(error=error)
    rows = forward_with_retries(model, torch.zeros(5, 1))
    assert rows == [error] * 5 and model.calls == [5]
    r = refusal_for(error)
    assert (r.status, r.retry, r.fatal) == (503, True, True) and "illegal" not in r.message


def test_device_fault_after_a_split_stops_the_retries():
    class Model(FakeModel):
        def __call__(self, x):
            self.calls.append(x.shape[0])
            if x.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            raise RuntimeError("CUDA error: unspecified launch failure")

    model = Model()
    rows = forward_with_retries(model, torch.zeros(8, 1))
    assert model.calls == [8, 4, 2] and all(is_device_fault(r) for r in rows) and len(rows) == 8


def test_other_errors_fail_the_batch_with_500():
    error = ValueError("shapes do not match")
    rows = forward_with_retries(FakeModel(error=error), torch.zeros(3, 1))
    assert rows == [error] * 3
    r = refusal_for(error)
    assert (r.status, r.retry, r.fatal) == (500, False, False) and "shapes" not in r.message


@pytest.mark.parametrize("error, fault", [
    (RuntimeError("CUDA error: device-side assert triggered"), True),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"), True),
    (torch.OutOfMemoryError("CUDA out of memory"), False),
    (RuntimeError("CUDA error: out of memory"), False),
    (RuntimeError("expected scalar type Float but found Half"), False),
    (ValueError("CUDA error: not a RuntimeError"), False),
])
def test_which_errors_poison_the_worker(error, fault):
    assert is_device_fault(error) is fault


def test_restart_back_off_is_bounded():
    limits = ServingLimits(restart_delay=1.0, max_restart_delay=10.0)
    assert [limits.restart_delay_after(n) for n in range(1, 8)] == [0.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


@pytest.mark.parametrize("kwargs, mentions", [
    ({"queue_timeout": 0}, "queue_timeout"), ({"max_queue": 0}, "max_queue"), ({"body_timeout": -1}, "body_timeout"),
    ({"restart_delay": 5.0, "max_restart_delay": 1.0}, "max_restart_delay"),
])
def test_limits_are_checked(kwargs, mentions):
    with pytest.raises(ValueError, match=mentions):
        ServingLimits(**kwargs)


def test_injected_faults(tmp_path):
    trigger = tmp_path / "boom"
    faults = InjectedFaults(f"oom_above=2,device_error_when={trigger}")
    forward = faults.wrap(lambda x: x + 1)
    assert torch.equal(forward(torch.zeros(2)), torch.ones(2))
    with pytest.raises(torch.OutOfMemoryError):
        forward(torch.zeros(3))
    trigger.touch()
    with pytest.raises(torch.AcceleratorError, match="illegal memory access"):
        forward(torch.zeros(1))
    assert not trigger.exists() and torch.equal(forward(torch.zeros(1)), torch.ones(1))  # once per trigger
    for bad in ("oom_above", "oom_above=x", "explode=1"):
        with pytest.raises(ValueError, match="FASTMVIT_SERVING_FAULTS"):
            InjectedFaults(bad)
