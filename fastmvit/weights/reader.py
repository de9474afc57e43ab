"""Safe reading of checkpoint files: safetensors, or ``torch.load(weights_only=True)``, never a pickle that
can run code. Whatever the file, the result is a flat ``{name: tensor}`` dict plus what the container
said about itself (a Hugging Face ``config.json``, for example)."""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

from ..errors import CheckpointError

__all__ = ["read_checkpoint", "unwrap_state_dict"]

# Files a Hugging Face save_pretrained directory may hold, in the order transformers prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Containers that hold the state dict one level down: mmpretrain/timm/mmcv training checkpoints use
# "state_dict", ml-cvnets training checkpoints "model_state_dict", others "model".
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


def _sniff(path: Path) -> str:
    """Tell the serialisation from the first bytes, not the file name."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 8:
        raise CheckpointError(f"{path} is not a checkpoint: the file is only {len(head)} bytes long")
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":  # pickle protocol 2+ (the legacy torch.save format)
        return "torch-legacy"
    header_len = int.from_bytes(head[:8], "little")
    if 2 <= header_len <= 100_000_000 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(
        f"{path} is not a checkpoint: it is neither safetensors nor a torch.save file "
        f"(first bytes {head[:8]!r}). Accepted: .safetensors, .pth/.pt/.bin written by torch.save, or a "
        f"Hugging Face save_pretrained directory")


def _read_file(path: Path) -> Mapping:
    kind = _sniff(path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} is a damaged safetensors file (truncated or corrupt): {e}") from e
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"refused to load {path}: it contains Python objects other than tensors, and unpickling "
                f"them could run arbitrary code. fastmvit loads checkpoints with torch.load(weights_only="
                f"True) only; re-save the state dict alone (torch.save(model.state_dict(), ...)) or as "
                f"safetensors") from e
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is a damaged torch checkpoint (truncated or corrupt): {e}") from e


def unwrap_state_dict(obj) -> Dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint container and drop wrapper prefixes (``module.``)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"a checkpoint must hold a dict of tensors, found {type(obj).__name__}")
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and not isinstance(inner, torch.Tensor):
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"the checkpoint holds no tensors (top-level keys: {list(obj)[:8]})")
    if all(k.startswith("module.") for k in tensors):  # saved from DataParallel / DDP
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def read_checkpoint(source) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read a path (file or Hugging Face directory) or take a state dict.

    Returns ``(tensors, info)`` where info has ``path`` and, for Hugging Face directories, ``hf_config``.
    """
    if isinstance(source, Mapping):
        return unwrap_state_dict(source), {"path": None}
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"weights must be a path or a state dict, got {type(source).__name__}")
    path = Path(source).expanduser()
    info: dict = {"path": str(path)}
    if path.is_dir():
        config_path = path / "config.json"
        if config_path.is_file():
            try:
                info["hf_config"] = json.loads(config_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
        files = [path / name for name in HF_WEIGHT_FILES if (path / name).is_file()]
        if not files:
            raise CheckpointError(f"{path} is a directory without {' or '.join(HF_WEIGHT_FILES)}; pass the "
                                  f"weight file itself or a Hugging Face save_pretrained directory")
        path = files[0]
        info["path"] = str(path)
    elif not path.exists():
        raise CheckpointError(f"no such checkpoint file: {path}")
    else:
        sibling = path.parent / "config.json"  # a weight file taken out of an HF directory
        if sibling.is_file():
            try:
                info["hf_config"] = json.loads(sibling.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
    return unwrap_state_dict(_read_file(path)), info


def hf_config_labels(info: dict) -> Optional[list]:
    """Class names from a Hugging Face config's id2label, when it has real ones."""
    id2label = (info.get("hf_config") or {}).get("id2label")
    if not id2label:
        return None
    labels = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
    if any(lab is None for lab in labels) or all(str(lab).startswith("LABEL_") for lab in labels):
        return None
    return labels
