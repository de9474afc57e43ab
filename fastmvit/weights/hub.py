"""Where the standard pretrained checkpoints live, and finding them: the fastmvit cache, then the Hugging
Face hub cache, then a download with ``huggingface_hub`` when the network allows."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import OptionError, WeightsNotFoundError
from ..variants import Variant

__all__ = ["PretrainedWeights", "pretrained_tags", "resolve_pretrained", "cache_dir"]

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class PretrainedWeights:
    """One published checkpoint: its hub location and the preprocessing it was evaluated with."""

    tag: str                  # timm's pretrained tag, e.g. "cvnets_in1k"
    repo_id: str              # Hugging Face hub repository
    filenames: Tuple[str, ...]  # tried in order
    source: str               # layout of the file: "timm" or "hf"
    input_size: int = 256
    crop_pct: float = 0.9     # timm's: resize the shorter side to floor(input_size / crop_pct)
    interpolation: str = "bicubic"
    channel_order: str = "RGB"

    def cache_name(self, variant: Variant) -> str:
        return f"{variant.timm_name}.{self.tag}"


def _timm(v: Variant, tag: str, input_size: int = 256, crop_pct: Optional[float] = None) -> PretrainedWeights:
    if crop_pct is None:
        crop_pct = 0.9 if v.family == "v1" else 0.888
    return PretrainedWeights(tag, f"timm/{v.timm_name}.{tag}", ("model.safetensors", "pytorch_model.bin"),
                             "timm", input_size, crop_pct)


def _apple(v: Variant) -> PretrainedWeights:
    # Apple's hub configs flip RGB to BGR and resize the shorter side to 288 with bilinear filtering.
    return PretrainedWeights("apple", v.hf_repo, ("model.safetensors", "pytorch_model.bin"), "hf",
                             256, 256 / 288, "bilinear", "BGR")


def pretrained_tags(variant: Variant) -> Dict[str, PretrainedWeights]:
    """Published checkpoints of a variant; the first is the default of ``load(name)``."""
    tags = {"cvnets_in1k": _timm(variant, "cvnets_in1k")}
    if variant.family == "v2" and variant.width >= 1.5:
        tags["cvnets_in22k_ft_in1k"] = _timm(variant, "cvnets_in22k_ft_in1k")
        tags["cvnets_in22k_ft_in1k_384"] = _timm(variant, "cvnets_in22k_ft_in1k_384", 384, 1.0)
    if variant.hf_repo:
        tags["apple"] = _apple(variant)
    return tags


def cache_dir() -> Path:
    """fastmvit's own weight cache: ``$FASTMVIT_CACHE``, else ``~/.cache/fastmvit``."""
    return Path(os.environ.get("FASTMVIT_CACHE", Path.home() / ".cache" / "fastmvit")).expanduser()


# One short attempt to reach the hub before downloading: huggingface_hub retries a failed request five
# times with backoff (about 30 s per file) and prints a warning each time; offline, that is a minute of
# noise before the error. A connection refused fails at once; an unroutable address after this timeout.
HUB_TIMEOUT_S = 5.0


def hub_timeout() -> float:
    """Seconds the one request to the hub may take: $FASTMVIT_HUB_TIMEOUT, else HUB_TIMEOUT_S."""
    text = os.environ.get("FASTMVIT_HUB_TIMEOUT", "").strip()
    try:
        value = float(text) if text else HUB_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise OptionError(f"FASTMVIT_HUB_TIMEOUT must be a positive number of seconds, got {text!r}")
    return value


def _remedies(variant: Variant, pw: PretrainedWeights) -> Dict[str, List[str]]:
    """The ways out when the weights are not here, for the Python API and the command line."""
    file = pw.filenames[0]
    url = f"https://huggingface.co/{pw.repo_id} ({file})"
    cached = cache_dir() / (pw.cache_name(variant) + ".safetensors")
    cache = f"or put it at {cached} (the fastmvit cache: $FASTMVIT_CACHE, default ~/.cache/fastmvit)"
    return {
        "python": [f"download {url} on a machine with network and pass it: "
                   f"fastmvit.load({variant.name!r}, weights='/path/to/{file}'), {cache};",
                   "any checkpoint of this variant from timm, Hugging Face, ml-cvnets or mmpretrain works as "
                   "weights=;",
                   f"or ask for random weights: fastmvit.load({variant.name!r}, pretrained=False)."],
        "cli": [f"download {url} on a machine with network and pass it: --weights /path/to/{file}, {cache};",
                "any checkpoint of this variant from timm, Hugging Face, ml-cvnets or mmpretrain works with "
                "--weights;",
                "or run with random weights (smoke tests): --random."],
    }


def resolve_pretrained(variant: Variant, tag=True) -> Tuple[str, PretrainedWeights]:
    """Return ``(local path, PretrainedWeights)`` for a variant's published checkpoint, downloading it
    only if it is in neither cache. ``tag``: True for the default checkpoint, or a tag name."""
    tags = pretrained_tags(variant)
    if tag is True:
        tag = next(iter(tags))
    if tag not in tags:
        raise OptionError(f"{variant.name!r} has no pretrained weights tagged {tag!r}; available: {list(tags)}")
    pw = tags[tag]

    for suffix in CHECKPOINT_SUFFIXES:
        local = cache_dir() / (pw.cache_name(variant) + suffix)
        if local.is_file():
            return str(local), pw

    import huggingface_hub

    for filename in pw.filenames:
        cached = huggingface_hub.try_to_load_from_cache(pw.repo_id, filename)
        if isinstance(cached, str):
            return cached, pw

    if _offline():
        why = "HF_HUB_OFFLINE is set"
    else:
        path, why = _download(pw)
        if path is not None:
            return path, pw
    raise WeightsNotFoundError(
        f"pretrained weights for {variant.name!r} ({pw.repo_id}) are not cached and could not be downloaded: "
        f"{why}. To continue:", _remedies(variant, pw))


def _download(pw: PretrainedWeights) -> Tuple[Optional[str], str]:
    """``(path, "")`` once a file of ``pw`` is downloaded, else ``(None, why not)``. Each file is first
    asked for with one short request; only a file the hub has is handed to ``hf_hub_download``."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    missing, endpoint, timeout = [], _endpoint(), hub_timeout()
    for filename in pw.filenames:
        url = huggingface_hub.hf_hub_url(pw.repo_id, filename, endpoint=endpoint)
        try:
            huggingface_hub.get_hf_file_metadata(url, timeout=timeout)
        except EntryNotFoundError:
            missing.append(filename)  # the repository lacks this file: try the next name
            continue
        except HfHubHTTPError as e:  # it answered, with a refusal (gated, no such repository, ...)
            return None, f"the hub at {endpoint} refused {filename} ({_first_line(e)})"
        except Exception as e:  # unreachable, timed out, refused connection: the other files would fare alike
            return None, f"the hub at {endpoint} did not answer ({_first_line(e)})"
        try:
            return huggingface_hub.hf_hub_download(pw.repo_id, filename, endpoint=endpoint,
                                                   etag_timeout=timeout), ""
        except Exception as e:  # the connection broke during the download, the disk is full, ...
            return None, f"downloading {filename} failed ({_first_line(e)})"
    return None, f"the repository has none of {', '.join(missing)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _endpoint() -> str:
    """The hub huggingface_hub talks to: $HF_ENDPOINT when it was imported, else huggingface.co."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
