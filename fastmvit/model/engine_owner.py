"""What a model that owns a fused/CPU engine cache does to keep it in step with itself: one place for
MobileViT and DeepLabV3 (``fastmvit.engine.engine.EngineCache``)."""
from __future__ import annotations

from torch import nn

from ..engine import DEFAULT_MAX_BATCH


class EngineOwner(nn.Module):
    """An ``nn.Module`` whose ``_engines`` (an ``EngineCache``, set in ``__init__``) is dropped whenever
    what it was built from changes: moving or casting (``_apply``), ``load_state_dict``, ``train()``, the
    CUDA-graph settings; ``invalidate_engine()`` after editing parameters in place."""

    @property
    def cuda_graph_max_batch(self):
        """Largest batch replayed through a CUDA graph: None (the default) lets memory decide (see
        ``fastmvit.engine.graphs``), 0 turns graphs off."""
        return self._cuda_graph_max_batch

    @cuda_graph_max_batch.setter
    def cuda_graph_max_batch(self, value) -> None:
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"cuda_graph_max_batch must be None (memory decides) or an int >= 0, got {value!r}")
        self._cuda_graph_max_batch = value
        if hasattr(self, "_engines"):
            self._engines.clear()  # the graph runners were built with the old limit

    @property
    def cuda_graphs(self) -> bool:
        return self.cuda_graph_max_batch != 0

    @cuda_graphs.setter
    def cuda_graphs(self, enabled: bool) -> None:
        self.cuda_graph_max_batch = DEFAULT_MAX_BATCH if enabled else 0

    def invalidate_engine(self) -> None:
        """Drop packed weights and captured graphs. Needed only after editing parameters, buffers or
        submodules in place, or changing FASTMVIT_DWCONV: moving, casting, load_state_dict, train()/eval(),
        set_numerics and the graph settings do it themselves."""
        self._engines.clear()

    def train(self, mode: bool = True):
        # Training (with backend="torch") updates BatchNorm statistics in place: the folded weights go stale.
        # (eval() on a model already in eval mode keeps its engine.)
        if hasattr(self, "_engines") and (self.training or mode):
            self._engines.clear()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        if hasattr(self, "_engines"):
            self._engines.clear()
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self._engines.clear()
        return super().load_state_dict(*args, **kwargs)
