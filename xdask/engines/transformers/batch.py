"""The running batch of the transformers engine: rows, their KV cache and mask.

Continuous batching on top of plain ``transformers`` models: every running
sequence is a row of one left-padded batch whose ``DynamicCache`` grows by
one column per decode step. New requests are prefilled together in their
own small batch, then joined to the running one by left-padding the shorter
cache; finished rows are dropped with ``index_select`` and columns that are
padding in every remaining row are trimmed. Each row keeps its own position
ids, so padding never shifts a sequence's positions.

Why not a paged cache: it needs custom attention kernels; this works with any
architecture transformers implements, on CPU and CUDA, and costs one cache
copy only when the batch's membership changes.
"""

from __future__ import annotations

from typing import Any

import torch


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _layers(cache: Any) -> list[Any]:
    return list(cache.layers)


class Batch:
    """Rows decoded together: cache, attention mask, next positions, last tokens."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cache: Any = None  # DynamicCache or None while empty
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self.positions = torch.zeros((0,), dtype=torch.long, device=device)
        self.last = torch.zeros((0,), dtype=torch.long, device=device)

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def join(self, other: Batch) -> None:
        """Append ``other``'s rows (after ours), left-padding the narrower side."""
        if self.size == 0:
            self.cache, self.mask, self.positions, self.last = other.cache, other.mask, other.positions, other.last
            return
        width = max(self.width, other.width)
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            length = max(mine.keys.shape[-2], theirs.keys.shape[-2])
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)
                setattr(mine, name, torch.cat(
                    [_pad_left(a, length - a.shape[-2], -2), _pad_left(b, length - b.shape[-2], -2)], dim=0))
            if hasattr(mine, "cumulative_length"):  # sliding-window layers count all tokens seen
                mine.cumulative_length = width
        self.mask = torch.cat(
            [_pad_left(self.mask, width - self.width, 1), _pad_left(other.mask, width - other.width, 1)], dim=0)
        self.positions = torch.cat([self.positions, other.positions])
        self.last = torch.cat([self.last, other.last])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); trim columns that are now all padding."""
        if not rows:
            self.__init__(self.device)  # type: ignore[misc]
            return
        idx = torch.tensor(rows, device=self.device)
        self.mask = self.mask.index_select(0, idx)
        self.positions = self.positions.index_select(0, idx)
        self.last = self.last.index_select(0, idx)
        used = (self.mask.sum(dim=0) > 0).nonzero()
        first = int(used[0]) if used.numel() else self.width
        new_width = self.width - first
        self.mask = self.mask[:, first:]
        for layer in _layers(self.cache):
            for name in ("keys", "values"):
                t = getattr(layer, name).index_select(0, idx)
                if t.shape[-2] > new_width:
                    t = t[..., t.shape[-2] - new_width :, :]
                setattr(layer, name, t.contiguous())
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = new_width

    def grow(self) -> torch.Tensor:
        """The attention mask for the next decode step (one more real column per row)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=1)
        return self.mask
