"""What the engine reads from the model when it is built, and what rebuilds it when that changes."""
import pytest
import torch

import fastmvit
from fastmvit.engine import GraphRunner
from fastmvit.model import Numerics

from .kernels.common import DEVICE
from .utils import images, randomize_


def _runner(model):
    (runner,) = model._engines._runners.values()
    return runner


def test_set_numerics_after_a_first_forward_rebuilds():
    """v2 at 48x48 has an odd stage map (3x3), where Hugging Face's numerics change the logits: the engine built
    with the default ("resize") numerics must not serve the "hf" ones."""
    ref = randomize_(fastmvit.load("v2-0.5", pretrained=False, backend="torch"), seed=11).to(DEVICE)
    fused = fastmvit.load("v2-0.5", weights=ref.state_dict(), backend="triton", device=DEVICE)
    x = images((1, 3, 48, 48)).to(DEVICE)
    with torch.inference_mode():
        fused._engines.runner(fused, x)             # built as a first forward builds it (packing only)
        resize = ref(x)
        fused.set_numerics(Numerics(v2_odd_size="hf"))
        ref.set_numerics(Numerics(v2_odd_size="hf"))
        expected = ref(x)
        got = fused(x)
    assert (expected - resize).abs().max() > 1e-2       # the two numerics do differ here
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)


def test_assigning_numerics_or_graph_settings_drops_the_engine(monkeypatch):
    built = []

    class Stub:
        def __init__(self, model, device, dtype):
            built.append(model.numerics)

        def __call__(self, x):
            return x.sum((1, 2, 3))[:, None]

    monkeypatch.setattr("fastmvit.engine.engine.Engine", Stub)
    model = fastmvit.load("xxs", pretrained=False, backend="triton")
    x = images((1, 3, 64, 64))
    with torch.inference_mode():
        model(x)
        model(x)
        assert len(built) == 1
        model.numerics = Numerics(attention="postscale")   # assigned without set_numerics
        model(x)
        assert len(built) == 2 and built[-1] == Numerics(attention="postscale")
        model.cuda_graph_max_batch = 4
        model(x)
        assert len(built) == 3 and _runner(model).max_batch == 4
        model.cuda_graphs = False
        assert model._engines._runners == {}
        model(x)
        assert _runner(model).max_batch == 0 and not model.cuda_graphs
        model.cuda_graphs = True
        model(x)
        assert _runner(model).max_batch is None and model.cuda_graphs
        model.eval()                                     # already in eval mode: keeps its engine
        assert len(model._engines._runners) == 1
    with pytest.raises(ValueError, match="cuda_graph_max_batch"):
        model.cuda_graph_max_batch = -1


def test_training_mode_drops_the_engine_and_is_refused_on_it():
    model = fastmvit.load("xxs", pretrained=False, backend="triton")
    model._engines._runners[(torch.device("cpu"), torch.float32)] = GraphRunner(lambda x: x)  # as if built
    model.train()
    assert model._engines._runners == {}
    with pytest.raises(RuntimeError, match="eval mode.*model.eval\\(\\)"):
        with torch.no_grad():
            model(images((1, 3, 64, 64)))
    model.backend = "torch"
    model(images((2, 3, 64, 64)))                        # training-mode BatchNorm on the torch path


@pytest.mark.parametrize("name", ["xxs", "deeplabv3-xxs"])
def test_a_cast_round_trip_drops_the_engine(name):
    """half() then float() ends on the dtype and device of the engine already built, with rounded weights:
    the engine packed from the old weights must not be served (both models share fastmvit.model.EngineOwner)."""
    model = fastmvit.load(name, pretrained=False, backend="triton", device=DEVICE)
    x = images((1, 3, 64, 64)).to(DEVICE)
    with torch.inference_mode():
        model._engines.runner(model, x)             # built as a first forward builds it (packing only)
    assert model._engines._runners
    model.half().float()
    assert not model._engines._runners
    model._engines.runner(model, x)
    model.load_state_dict(model.state_dict())
    assert not model._engines._runners
