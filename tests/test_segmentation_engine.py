"""DeepLabV3 on the fused engine (backend="triton": the kernels interpreted on CPU tensors) against its torch
path, which tests/test_segmentation.py holds to Hugging Face: the dilated backbones at output strides 8, 16
and 32, v2's local depthwise conv dilated (ml-cvnets) or not (Hugging Face), the ASPP head, and the label
maps of the fused upsample + argmax."""
import copy

import pytest
import torch

from fastmvit.model.layers import NUMERICS_PRESETS
from fastmvit.model.segmentation import DeepLabV3, SegmentationConfig
from fastmvit.ops.labels import bilinear_argmax_reference

from .utils import assert_matches_torch_path, image_sensitive_, max_err, varied_images


def seg_model(name, output_stride, numerics="cvnets", align_corners=False, seed=0):
    model = DeepLabV3(name, SegmentationConfig(output_stride=output_stride)).set_numerics(NUMERICS_PRESETS[numerics])
    image_sensitive_(model, seed=seed).eval()
    model.pretrained_cfg = {"upsample_align_corners": align_corners}
    model.backend = "triton"
    return model


def engine_logits(model, x):
    with torch.inference_mode():
        return model(x)


CASES = [  # (variant, output stride, numerics, H, W)
    ("xxs", 8, "cvnets", 64, 64),
    ("xxs", 16, "hf", 96, 80),
    ("xxs", 32, "cvnets", 64, 64),
    ("v2-0.5", 8, "cvnets", 64, 64),
    ("v2-0.5", 8, "hf", 64, 64),
    ("v2-0.5", 16, "cvnets", 96, 80),   # odd stage maps: ml-cvnets' resize inside the dilated stages
    ("v2-0.5", 16, "hf", 96, 80),       # ... and Hugging Face's crop
]


@pytest.mark.parametrize("name,output_stride,numerics,H,W", CASES,
                         ids=[f"{n}-os{o}-{m}-{h}x{w}" for n, o, m, h, w in CASES])
def test_float32_logits_match_the_torch_path(name, output_stride, numerics, H, W):
    model = seg_model(name, output_stride, numerics)
    x = varied_images((2, 3, H, W), seed=output_stride)
    out = engine_logits(model, x)
    assert out.shape[:2] == (2, 21)  # at about 1/output_stride (ml-cvnets enlarges odd v2 maps)
    assert_matches_torch_path(out, model, x, f"{name} os{output_stride} {numerics}")


def test_float16_logits_match_the_torch_path():
    model = seg_model("v2-0.5", 16, "cvnets").half()
    x = varied_images((2, 3, 64, 64), seed=3).half()
    assert_matches_torch_path(engine_logits(model, x), model, x, "v2-0.5 os16 float16")


def test_the_engine_runs_the_dilated_kernels():
    """Every dilated conv of the module tree reaches its kernel with that dilation (the v2 local convs only
    with ml-cvnets' numerics), and dilated inverted residuals run unfused."""
    from fastmvit.engine.plan import DeepLabHeadStep, InvertedResidualStep, MobileViTv2Step, build_steps

    for numerics, local in (("cvnets", [1, 2, 4]), ("hf", [1, 1, 1])):  # stages 3, 4, 5
        model = seg_model("v2-0.5", 8, numerics)
        steps = build_steps(model, torch.device("cpu"), torch.float32)
        assert [s.dilation for s in steps if isinstance(s, MobileViTv2Step)] == local
        dilated_ir = [s for s in steps if isinstance(s, InvertedResidualStep) and s.dilation > 1]
        assert [s.dilation for s in dilated_ir] == [2] and all(s.fused is None for s in dilated_ir)
        assert [d for *_, d in steps[-1].atrous] == [6, 12, 18] and isinstance(steps[-1], DeepLabHeadStep)


@pytest.mark.parametrize("align_corners,size", [(False, None), (True, (37, 50))], ids=["hf", "cvnets-37x50"])
def test_labels_are_the_upsampled_argmax(align_corners, size):
    """``labels`` on the engine: the fused kernel's map equals F.interpolate + argmax of the engine's own
    logits (where the best class leads by more than rounding), and the torch path's labels wherever the
    torch logits decide by more than the engine's error; at the input's size (default) and at a size of
    the caller's choosing."""
    model = seg_model("xxs", 16, "cvnets", align_corners=align_corners)
    x = varied_images((2, 3, 64, 64), seed=5)
    at = {} if size is None else {"size": size}
    out = size or (64, 64)
    with torch.inference_mode():
        logits = model(x)
        labels = model.labels(x, **at)
        ref_model = copy.deepcopy(model)
        ref_model.backend = "torch"
        torch_labels = ref_model.labels(x, **at)
        torch_logits = ref_model(x)
    assert labels.shape == (2, *out) and labels.dtype == torch.int64
    assert torch.equal(labels, bilinear_argmax_reference(logits, out, align_corners))
    up = torch.nn.functional.interpolate(torch_logits, size=out, mode="bilinear", align_corners=align_corners)
    top2 = up.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 4 * max_err(logits, torch_logits)
    assert decided.float().mean() > 0.9 and len(labels.unique()) > 2  # a map of several classes
    assert torch.equal(labels[decided], torch_labels[decided])


def test_info_plan_and_warmup_cover_the_head_and_the_label_map():
    """``info --plan`` and the warm-up's recording (both stubbed: no kernel runs) see the ASPP's kernels,
    the atrous convs' ReLU and the label-map kernel, with the GPU's launch rules."""
    from fastmvit.engine.plan_info import fusion_rows, launches
    from fastmvit.engine.warmup import distinct, record_launches

    rows = launches("deeplabv3-xxs", 1, 128)
    kernels = [r["kernel"] for r in rows]
    assert kernels[-1] == "labels._bilinear_argmax_kernel" and kernels.count("aspp._pointwise_kernel") == 3
    assert sum(r["constexprs"].get("ACT") == "relu" for r in rows) == 3
    assert [r["fused"] for r in fusion_rows("deeplabv3-xxs", 1, 128)][-1] is False  # stage 5's, dilated
    model = seg_model("v2-0.5", 16, "hf", align_corners=True)
    names = [(s.name, dict(s.args).get("ALIGN")) for s in distinct(record_launches(model, (1,), ((64, 64),)))]
    assert ("_bilinear_argmax_kernel", True) in names and ("_pointwise_kernel", None) in names
