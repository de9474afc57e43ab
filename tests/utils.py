"""Helpers shared by the tests: random weights with random BatchNorm statistics, images that differ from
each other, reference models, and the error bound a whole model is held to."""
import copy

import torch

from fastmvit.model.random import randomize_  # noqa: F401  (re-exported for the tests)

# Whole-model bound (the kernel tests' rule, tests/kernels/common.py): fastmvit's max error against the
# float64 torch path may be FACTOR x the float32/float16 torch path's own max error, plus a floor of a few
# units in the last place relative to the largest logit.
FACTOR = 2.0
REL_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Different images' logits must be this many bounds apart, so a row swapped, mixed with another image's
# or taken from the wrong image fails the bound by a wide margin.
SEPARATION = 4.0


def images(shape, seed: int = 1) -> torch.Tensor:
    """Random images in [0, 1] (uniform noise)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def varied_images(shape, seed: int = 1) -> torch.Tensor:
    """Random images in [0, 1] that differ in content, not only in noise: each is noise over its own
    random colour and gradient. Uniform noise alone averages out in the pooled features, so a random
    network gives two noise images almost the same logits."""
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    yy = torch.linspace(-1, 1, H).view(1, 1, H, 1)
    xx = torch.linspace(-1, 1, W).view(1, 1, 1, W)
    colour = torch.rand(B, C, 1, 1, generator=g)
    slope_y, slope_x = (torch.rand(2, B, C, 1, 1, generator=g) - 0.5)
    smooth = colour + slope_y * yy + slope_x * xx
    noise = torch.rand(shape, generator=g)
    return (0.6 * smooth + 0.4 * noise).clamp_(0, 1)


def image_sensitive_(model, size=64, seed: int = 0):
    """``randomize_``, then BatchNorm statistics measured on a few varied images and the classifier
    re-centred, in place: weights whose logits depend on the image.

    With arbitrary statistics a random network maps every image to nearly the same features (the
    image-dependent part was below 1e-3 of them, under float16's resolution), so logits could not tell
    images apart. Statistics measured on real inputs re-centre every layer, as training does; the weights,
    affines and statistics all stay distinct per channel, so a mis-mapped tensor still shows. A model
    without ``forward_features`` (DeepLabV3) measures them through its whole forward (the torch path)."""
    randomize_(model, seed=seed)
    device = next(model.parameters()).device
    x = varied_images((8, 3, size, size), seed=1000 + seed).to(device)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass gives the batch statistics
        model.train()
        with torch.no_grad():
            getattr(model, "forward_features", model)(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    fc = getattr(model.head, "fc", None)
    if isinstance(fc, torch.nn.Linear):
        with torch.no_grad():
            pooled = model.forward_features(x).mean(dim=(-2, -1))
            spread = (pooled - pooled.mean(0)) @ fc.weight.t()
            fc.weight.mul_(1.0 / spread.std().clamp_min(1e-12))
            fc.bias.copy_(-(fc.weight @ pooled.mean(0)))
    return model


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def torch_reference(model, x: torch.Tensor, dtype: torch.dtype):
    """The torch path of ``model`` (a copy) on ``x``: (float64 output, output in ``dtype``)."""
    ref = copy.deepcopy(model).to(x.device)
    ref.backend = "torch"
    with torch.inference_mode():
        ref64 = ref.double()(x.double())
        same = ref.to(dtype)(x.to(dtype))
    return ref64, same


def assert_images_apart(ref64: torch.Tensor, bound: float, what: str = "", separation: float = SEPARATION) -> float:
    """Every two rows of ``ref64`` (different images) differ by more than ``separation`` x ``bound``."""
    B = ref64.shape[0]
    assert B >= 2, "needs at least two images"
    gap = min(max_err(ref64[i], ref64[j]) for i in range(B) for j in range(i + 1, B))
    assert gap > separation * bound, (f"{what}: different images' outputs differ by only {gap:.3g}, less than "
                                      f"{separation} x the bound {bound:.3g}: this test could not tell them apart")
    return gap


def assert_matches_torch_path(out: torch.Tensor, model, x: torch.Tensor, what: str = "") -> None:
    """``out`` (fastmvit on ``x`` in ``out.dtype``) within FACTOR x the torch path's own error in that dtype
    of the float64 torch path, plus a floor; and the images of ``x`` far enough apart that a row swapped
    or mixed with another image's could not pass."""
    ref64, same = torch_reference(model, x, out.dtype)
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (an element left unwritten?)"
    err_torch = max_err(same, ref64)
    bound = FACTOR * err_torch + REL_FLOOR[out.dtype] * ref64.abs().max().item()
    err = max_err(out, ref64)
    assert err <= bound, (f"{what}: max error {err:.3g} > {FACTOR} x the torch path's {err_torch:.3g} + floor "
                          f"= {bound:.3g} ({out.dtype})")
    assert_images_apart(ref64, bound, what)


def hf_config(variant, num_labels: int = 1000, **options):
    """The Hugging Face transformers config of a fastmvit variant (``options``: output_stride, ...)."""
    import transformers

    if variant.family == "v1":
        dims = [s.transformer.dim for s in variant.stages[2:]]
        return transformers.MobileViTConfig(
            hidden_sizes=dims, neck_hidden_sizes=[variant.stem_channels, *variant.stage_channels,
                                                  variant.final_conv_channels],
            expand_ratio=float(variant.stages[0].expand), num_labels=num_labels, **options)
    return transformers.MobileViTV2Config(width_multiplier=variant.width, num_labels=num_labels, **options)


def hf_model(variant, num_labels: int = 1000):
    """The Hugging Face transformers model of a fastmvit variant, randomly initialised (eval mode)."""
    import transformers

    cls = (transformers.MobileViTForImageClassification if variant.family == "v1"
           else transformers.MobileViTV2ForImageClassification)
    return cls(hf_config(variant, num_labels)).eval()


def hf_segmentation_model(variant, output_stride: int = 16, num_labels: int = 21, **options):
    """Hugging Face's MobileViT[V2]ForSemanticSegmentation of a fastmvit variant, randomly initialised (eval)."""
    import transformers

    cls = (transformers.MobileViTForSemanticSegmentation if variant.family == "v1"
           else transformers.MobileViTV2ForSemanticSegmentation)
    return cls(hf_config(variant, num_labels, output_stride=output_stride, **options)).eval()


def photo(width, height, seed):
    """A smooth RGB PIL image with texture: a crop or resize off by one pixel changes it everywhere."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8), "RGB")
