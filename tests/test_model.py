"""The module's contract: input checks with clear errors, any input size, feature maps, dtypes."""
import os
import subprocess
import sys

import pytest
import torch

import fastmvit
from fastmvit import InputError

from .utils import assert_images_apart, image_sensitive_, max_err, torch_reference, varied_images


@pytest.fixture(scope="module")
def xxs():
    return fastmvit.load("xxs", pretrained=False)


@pytest.mark.parametrize("x,match", [
    (torch.rand(3, 64, 64), r"\[B, 3, H, W\] \(4 dims\), got shape \[3, 64, 64\]; add a batch dimension"),
    (torch.rand(1, 1, 3, 64, 64), r"4 dims\), got shape \[1, 1, 3, 64, 64\]"),
    (torch.rand(2, 1, 64, 64), r"expected 3 colour channels in dim 1 \(NCHW\), got shape \[2, 1, 64, 64\]"),
    (torch.rand(2, 64, 64, 3), r"looks channels-last, use x.permute\(0, 3, 1, 2\)"),
    (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), r"floating-point .* got torch.uint8"),
    (torch.rand(1, 3, 16, 64), r"image of 16x64 is too small: .* at least 32"),
    (torch.rand(0, 3, 64, 64), r"empty batch"),
    (torch.rand(1, 3, 64, 64, dtype=torch.float64), r"input dtype torch.float64 does not match the model's "
                                                     r"torch.float32"),
    ([[0.0]], r"expected a torch.Tensor"),
])
def test_bad_input_is_explained(xxs, x, match):
    with pytest.raises(InputError, match=match):
        xxs(x)


def test_input_on_another_device_is_explained():
    model = fastmvit.load("xxs", pretrained=False).to("meta")
    with pytest.raises(InputError, match=r"input is on cpu but the model is on meta"):
        model(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("name", ["xxs", "v2-0.5"])
@pytest.mark.parametrize("size", [(32, 32), (97, 131), (250, 300)])
def test_any_input_size(name, size):
    model = fastmvit.load(name, pretrained=False)
    with torch.inference_mode():
        assert model(varied_images((1, 3, *size))).shape == (1, 1000)


def test_stage_maps_and_features(xxs):
    x = varied_images((2, 3, 96, 128))
    with torch.inference_mode():
        stages = xxs.forward_stages(x)
        features = xxs.forward_features(x)
        logits = xxs(x)
    assert [tuple(s.shape) for s in stages] == [(2, 16, 48, 64), (2, 24, 24, 32), (2, 48, 12, 16),
                                                 (2, 64, 6, 8), (2, 80, 3, 4)]
    assert features.shape == (2, 320, 3, 4)
    torch.testing.assert_close(logits, xxs.forward_head(features), rtol=0, atol=0)


def test_v2_keeps_the_enlarged_map_at_odd_sizes():
    """ml-cvnets/timm semantics: a 7x7 v2 stage-5 input is enlarged to 8x8 and stays 8x8."""
    model = fastmvit.load("v2-0.5", pretrained=False)
    with torch.inference_mode():
        assert model.forward_features(varied_images((1, 3, 224, 224))).shape == (1, 256, 8, 8)
        hf = fastmvit.load("v2-0.5", pretrained=False, numerics="hf")
        assert hf.forward_features(varied_images((1, 3, 224, 224))).shape == (1, 256, 7, 7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(dtype):
    """The torch path in float16/bfloat16 against itself in float64, on weights whose logits tell images
    apart. Bound: its float32 error scaled by the ratio of the formats' machine epsilons (rounding error
    grows with the rounding unit; measured: float16 0.5x, bfloat16 0.6x of that bound), and the images
    must stay further apart than twice that, so a row from the wrong image or a wrong cast fails."""
    ref = image_sensitive_(fastmvit.load("xxs", pretrained=False, backend="torch"), seed=13)
    x = varied_images((3, 3, 64, 64))
    model = fastmvit.load("xxs", weights=ref.state_dict(), dtype=dtype)
    with torch.inference_mode():
        out = model(x.to(dtype))
    assert out.dtype == dtype
    ref64, ref32 = torch_reference(ref, x, torch.float32)
    eps_ratio = torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
    bound = max_err(ref32, ref64) * eps_ratio
    assert max_err(out, ref64) <= bound, (max_err(out, ref64), bound)
    assert_images_apart(ref64, bound, f"xxs {dtype}", separation=2.0)


def test_module_behaves_like_a_module(xxs):
    assert not xxs.training
    copy = fastmvit.load("xxs", pretrained=False).to(torch.float64)
    assert copy.stem.conv.weight.dtype == torch.float64
    assert "variant='xxs'" in repr(copy).splitlines()[0] or "variant='xxs'" in repr(copy)


def test_import_is_light():
    """Importing fastmvit imports no Triton, initialises no CUDA and opens no socket."""
    # torch.cuda.is_initialized() is always False on a CPU build of torch: record every attempt to
    # initialise CUDA instead (torch.cuda._lazy_init), which a CPU build sees too, even one caught.
    code = ("import sys, socket\n"
            "socket.socket.connect = lambda *a: (_ for _ in ()).throw(RuntimeError('network'))\n"
            "import torch\n"
            "tried, lazy_init = [], torch.cuda._lazy_init\n"
            "torch.cuda._lazy_init = lambda: tried.append(1) or lazy_init()\n"
            "import fastmvit\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n"
            "fastmvit.load('xxs', pretrained=False)\n"
            "assert 'triton' not in sys.modules\n"
            "assert not tried and not torch.cuda.is_initialized(), 'CUDA initialised'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_checkout_root_does_not_hide_the_kernels_distribution(tmp_path):
    """Run from the checkout's root (``python -m ...``, pytest), the top-level ``kernels/`` folder must not
    stand in for an installed ``kernels`` distribution, which transformers imports whenever it is there;
    with none installed it fails as an absent package does. fastmvit's own kernels stay fastmvit.kernels."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARK = 'installed kernels'\n")
    code = ("import sys\n"
            f"sys.path[:] = [{root!r}, {str(tmp_path / 'site')!r}] + sys.path\n"
            "import kernels\n"
            "assert getattr(kernels, 'MARK', None) == 'installed kernels', kernels.__file__\n"
            "import fastmvit.kernels._common\n"
            f"assert fastmvit.kernels.__file__.startswith({root!r}), fastmvit.kernels.__file__\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
    absent = ("import sys\n"
              f"sys.path[:] = [{root!r}] + [p for p in sys.path if 'site-packages' not in p]\n"
              "try:\n    import kernels\nexcept ImportError as e:\n    assert e.name == 'kernels'\n"
              "else:\n    raise AssertionError('fastmvit kernels/ imported as top-level kernels')\n")
    subprocess.run([sys.executable, "-c", absent], check=True, cwd=root)
