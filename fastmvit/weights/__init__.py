"""Checkpoint formats: safe reading, layout detection, key maps and pretrained-weight resolution."""
from .convert import CanonicalWeights, detect_format, from_canonical, to_canonical
from .hub import PretrainedWeights, cache_dir, pretrained_tags, resolve_pretrained
from .layouts import FORMATS, key_table
from .reader import read_checkpoint

__all__ = [
    "FORMATS", "CanonicalWeights", "PretrainedWeights", "cache_dir", "detect_format", "from_canonical",
    "key_table", "pretrained_tags", "read_checkpoint", "resolve_pretrained", "to_canonical",
]
