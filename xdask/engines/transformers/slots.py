"""Fixed KV slots for the transformers engine, with CUDA graphs for decode steps.

Why: a GPU decoding one or a few sequences is bound by kernel launches, not
by arithmetic (FACTS: 61 tok/s for a 0.5B model at batch 1, where bandwidth
allows ~3,400). Replaying a captured CUDA graph issues a whole decode step in
one launch, but a graph needs fixed shapes and addresses: this layout gives
them. Like llama.cpp's slots, each sequence owns a row of a preallocated
``[slots, kv_heads, max_len, head_dim]`` buffer per layer and writes its new
token at its own position; the attention mask says which columns each row
may see. Running rows are kept in the lowest slots, so a step for ``n`` rows
replays the graph captured for the smallest batch bucket ``>= n`` and the
smallest length bucket that covers the longest row.

Prefill runs eagerly, one request at a time, into a throw-away dynamic cache
whose keys are then copied into the request's slot.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: Columns a step attends to: steps of 128 up to 4096 (a coarser bucket costs attention over
#: padding at large batches), then powers of two.
LENGTH_BUCKETS = (*range(128, 4097, 128), 8192, 16384, 32768)


class SlotCache:
    """The duck-typed cache the model's attention layers write into during a decode step."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype: Any, device: Any):
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows = 0  # rows of the current step (a batch bucket)
        self.width = max_len  # columns the current step attends to (a length bucket)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self._arange: dict[int, torch.Tensor] = {}

    # The model calls only these two during a forward pass with explicit positions and masks.
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        n = self.rows
        rows = self._rows(n)
        pos = self.positions[:n]
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[rows, :, pos, :] = key_states[:, :, 0, :]
        v[rows, :, pos, :] = value_states[:, :, 0, :]
        return k[:n, :, : self.width, :], v[:n, :, : self.width, :]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def _rows(self, n: int) -> torch.Tensor:
        if n not in self._arange:
            self._arange[n] = torch.arange(n, device=self.positions.device)
        return self._arange[n]


class SlotBatch:
    """Running sequences in KV slots; decode steps replayed from CUDA graphs on CUDA."""

    def __init__(self, model: Any, slots: int, max_len: int, use_graphs: bool):
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and any(
            t == "sliding_attention" for t in getattr(cfg, "layer_types", None) or ()
        ):
            raise ValueError("slot layout does not support sliding-window layers")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.model = model
        self.device = next(model.parameters()).device
        self.slots = slots
        self.max_len = max_len
        self.cache = SlotCache(cfg.num_hidden_layers, slots, kv_heads, max_len, head_dim,
                               next(model.parameters()).dtype, self.device)
        self.size = 0
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self._tokens = torch.zeros((slots, 1), dtype=torch.long, device=self.device)
        self._graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self._pool: Any = None
        self.lengths: list[int] = []  # tokens in each running row's cache

    # -- membership -----------------------------------------------------------------

    def admit(self, ids: list[int]) -> torch.Tensor:
        """Prefill one prompt into the next free slot; returns its last logits ``[V]``."""
        from transformers import DynamicCache

        if self.size >= self.slots:
            raise RuntimeError("no free KV slot")
        if len(ids) >= self.max_len:
            raise ValueError("prompt longer than the slot")
        slot = self.size
        input_ids = torch.tensor([ids], device=self.device)
        positions = torch.arange(len(ids), device=self.device).unsqueeze(0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, position_ids=positions, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        for i, layer in enumerate(out.past_key_values.layers):
            self.cache.keys[i][slot, :, : len(ids), :] = layer.keys[0]
            self.cache.values[i][slot, :, : len(ids), :] = layer.values[0]
        self.cache.positions[slot] = len(ids)
        self.lengths.append(len(ids))
        self.size += 1
        return out.logits[0, -1]

    def keep(self, rows: list[int]) -> None:
        """Keep running rows ``rows`` (increasing), moving them down into the lowest slots."""
        for new, old in enumerate(rows):
            if new != old:
                n = self.lengths[old]
                for k in (*self.cache.keys, *self.cache.values):
                    k[new, :, :n, :] = k[old, :, :n, :]
                self.cache.positions[new] = self.cache.positions[old]
        self.lengths = [self.lengths[r] for r in rows]
        self.size = len(rows)

    # -- decode -------------------------------------------------------------------------

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One step for every running row (``tokens`` are their last tokens); logits ``[n, V]``."""
        n = self.size
        rows = BATCH_BUCKETS[bisect.bisect_left(BATCH_BUCKETS, n)] if n <= BATCH_BUCKETS[-1] else n
        rows = min(rows, self.slots)
        longest = max(self.lengths) + 1
        idx = bisect.bisect_left(LENGTH_BUCKETS, longest)
        width = min(LENGTH_BUCKETS[idx] if idx < len(LENGTH_BUCKETS) else self.max_len, self.max_len)
        self._tokens[:n, 0] = torch.tensor(tokens, device=self.device)
        if rows > n:  # padding rows write to their own free slots, at column 0; nobody reads them
            self._tokens[n:rows, 0] = 0
            self.cache.positions[n:rows] = 0
        if self.use_graphs:
            logits = self._replay(rows, width)
        else:
            logits = self._step(rows, width)
        self.cache.positions[:n] += 1
        self.lengths = [x + 1 for x in self.lengths]
        return logits[:n]

    def _step(self, rows: int, width: int) -> torch.Tensor:
        cache = self.cache
        cache.rows, cache.width = rows, width
        pos = cache.positions[:rows]
        cols = torch.arange(width, device=self.device)
        mask = (cols.unsqueeze(0) <= pos.unsqueeze(1))[:, None, None, :]
        out = self.model(input_ids=self._tokens[:rows], position_ids=pos.unsqueeze(1),
                         attention_mask={"full_attention": mask}, past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :]

    def _replay(self, rows: int, width: int) -> torch.Tensor:
        key = (rows, width)
        if key not in self._graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            saved = self.cache.positions.clone()
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up on the side stream, as CUDA graph capture requires
                    self._step(rows, width)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):  # on this model's GPU, not the first one
                logits = self._step(rows, width)
            self._pool = graph.pool()
            self.cache.positions.copy_(saved)  # warm-ups and capture wrote harmless columns only
            self._graphs[key] = (graph, logits)
        graph, logits = self._graphs[key]
        self.cache.rows, self.cache.width = rows, width
        graph.replay()
        return logits
