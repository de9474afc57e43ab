"""The whole model through the engine with the batch-1 splits forced (FASTMVIT_SPLIT: split-K convs, the
token-split separable-attention context) against the torch path; the split is resolved once per input
signature, so a replay reads no environment."""
import pytest
import torch

import fastmvit
from fastmvit.kernels import conv as K

from .kernels.common import DEVICE
from .utils import assert_matches_torch_path, image_sensitive_, varied_images

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _splits(engine):
    """(split convs, split contexts) among the engine's recorded plans."""
    from fastmvit.ops.conv import ConvPlan
    from fastmvit.ops.sepattn import ContextPlan

    plans = [p for calls, _ in engine._plans.values() for _, p, _ in calls]
    convs = sum(isinstance(p, ConvPlan) and isinstance(p.launch, K.SplitConvLaunch) for p in plans)
    contexts = sum(isinstance(p, ContextPlan) and p.plan.merge is not None for p in plans)
    return convs, contexts


@pytest.mark.parametrize("name", ["xxs", "v2-0.5"])
def test_forced_splits_match_the_torch_path(name, monkeypatch):
    ref = image_sensitive_(fastmvit.load(name, pretrained=False, backend="torch"), size=64, seed=7).to(DEVICE)
    fused = fastmvit.load(name, weights=ref.state_dict(), backend="triton", device=DEVICE)
    x = varied_images((2, 3, 64, 64)).to(DEVICE)
    monkeypatch.setenv("FASTMVIT_SPLIT", "3")
    with torch.inference_mode():
        got = fused(x)
    engine = fused._engines.engine(fused, x)
    convs, contexts = _splits(engine)
    if name == "xxs":
        assert convs == 6  # the local and the fusion conv of each of the three transformer stages
    else:
        assert contexts >= 1 and convs == 0  # v2 has no dense 3x3 but the stem (one K step: never split)
    assert_matches_torch_path(got, ref, x, f"{name} split 3")
    # a replay uses the recorded plans: it must not read FASTMVIT_SPLIT (a bad value would raise)
    monkeypatch.setenv("FASTMVIT_SPLIT", "not a number")
    with torch.inference_mode():
        again = fused(x)
    assert torch.equal(again, got)
