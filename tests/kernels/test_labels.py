"""fastmvit::bilinear_argmax (segmentation label maps: bilinear upsampling fused with the argmax) against
F.interpolate + argmax, the arithmetic of fastmvit.masks.label_map."""
import pytest
import torch

from fastmvit.kernels import labels as K
from fastmvit.ops.labels import bilinear_argmax, bilinear_argmax_plan, bilinear_argmax_reference

from .common import DEVICE, DTYPES, dtype_id

# (B, classes, h, w, H, W): non-integer ratios, both directions, downsampling, the same size, 1-pixel maps
CASES = [
    (2, 21, 5, 7, 37, 61),
    (2, 5, 8, 8, 64, 64),
    (1, 3, 6, 9, 4, 5),
    (2, 4, 7, 5, 7, 5),
    (1, 6, 1, 1, 9, 3),
    (2, 7, 3, 4, 1, 11),
]


def case_id(c):
    return "B{}-NC{}-{}x{}-to-{}x{}".format(*c)


def assert_labels(out, logits, size, align, what):
    """Equal to the reference wherever its best class leads the runner-up by more than float32 rounding of
    the interpolation (a few ulps of the logits): there the order of the float operations cannot decide."""
    ref = bilinear_argmax_reference(logits, size, align)
    assert out.shape == ref.shape and out.dtype == torch.int64, what
    up = logits.float()
    if tuple(size) != tuple(up.shape[-2:]):
        up = torch.nn.functional.interpolate(up, size=size, mode="bilinear", align_corners=align)
    top2 = up.topk(min(2, up.shape[1]), dim=1).values
    margin = (top2[:, 0] - top2[:, -1]) if up.shape[1] > 1 else torch.full_like(top2[:, 0], float("inf"))
    decided = margin > 1e-5 * up.abs().amax().clamp_min(1)
    assert decided.float().mean() > 0.99, f"{what}: the test's logits leave too many near-ties"
    bad = (out != ref) & decided
    assert not bad.any(), f"{what}: {int(bad.sum())} labels differ from F.interpolate + argmax"


@pytest.mark.parametrize("align", [False, True], ids=["half-pixel", "align-corners"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bilinear_argmax(case, dtype, align):
    B, NC, h, w, H, W = case
    g = torch.Generator().manual_seed(NC * 100 + h)
    logits = (torch.randn(B, NC, h, w, generator=g) * 3).to(DEVICE, dtype)
    out = bilinear_argmax(logits, (H, W), align)
    assert_labels(out, logits, (H, W), align, f"{case_id(case)}-{dtype_id(dtype)}-align{align}")
    assert (out >= 0).all() and (out < NC).all()
    # the engine's layout: a channels-last view (NCHW shape, classes contiguous), and a launch plan
    cl = logits.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    planned = bilinear_argmax_plan(cl, (H, W), align)(cl)
    torch.testing.assert_close(planned, out, rtol=0, atol=0)


def test_ties_go_to_the_lowest_class():
    """Equal logits everywhere: class 0; two equal best planes: the lower of the two, as torch.argmax."""
    flat = torch.zeros(2, 5, 3, 4, device=DEVICE)
    assert (bilinear_argmax(flat, (7, 9)) == 0).all()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, 4, generator=g).to(DEVICE) - 10
    logits[:, 3] = logits[:, 1] = 5 + torch.rand(2, 3, 4, generator=g).to(DEVICE)
    out = bilinear_argmax(logits, (7, 9))
    assert (out == 1).all() and torch.equal(out, bilinear_argmax_reference(logits, (7, 9)))


def test_source_scale_is_pytorchs():
    """in/out (half-pixel centres) or (in - 1)/(out - 1) (corners), rounded to float32."""
    assert K.source_scale(5, 37, False) == float(torch.tensor(5 / 37, dtype=torch.float32))
    assert K.source_scale(5, 37, True) == float(torch.tensor(4 / 36, dtype=torch.float32))
    assert K.source_scale(5, 1, True) == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="logits"):
        bilinear_argmax(torch.zeros(2, 3, 4, device=DEVICE), (4, 4))
    with pytest.raises(ValueError, match="size"):
        bilinear_argmax(torch.zeros(1, 3, 4, 4, device=DEVICE), (0, 4))
    with pytest.raises(TypeError, match="float32"):
        bilinear_argmax(torch.zeros(1, 3, 4, 4, dtype=torch.int32, device=DEVICE), (4, 4))
