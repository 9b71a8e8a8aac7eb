"""Batched sampling for the transformers engine: one call per decode step.

Rows differ in temperature, top_p, penalties and seed; doing each row alone
costs a handful of tiny kernels per row (launch-bound on a GPU), so rows are
grouped: greedy rows take one argmax, sampled rows one softmax and top-p
mask, and only rows with their own seed draw with their own generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RowSampling:
    """One sequence's sampling settings and its private random generator."""

    temperature: float
    top_p: float
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


def _apply_penalties(logits: torch.Tensor, rows: list[RowSampling], history: list[list[int]]) -> None:
    for i, row in enumerate(rows):
        if not row.penalized or not history[i]:
            continue
        ids = torch.tensor(history[i], device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)
        logits[i] -= row.frequency_penalty * counts + row.presence_penalty * (counts > 0).to(logits.dtype)


def _top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tail outside each row's nucleus (the top token always stays)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    outside = (cumulative - sorted_probs) > top_p.unsqueeze(-1)
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample(logits: torch.Tensor, rows: list[RowSampling], history: list[list[int]]) -> list[int]:
    """One token per row of ``logits`` [B, V]; returns them as Python ints."""
    logits = logits.float()
    if any(r.penalized for r in rows):
        _apply_penalties(logits, rows, history)
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.greedy]
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        temps = torch.tensor([rows[i].temperature for i in sampled], device=logits.device)
        top_p = torch.tensor([rows[i].top_p for i in sampled], device=logits.device)
        probs = torch.softmax(logits.index_select(0, idx) / temps.unsqueeze(-1), dim=-1)
        if bool((top_p < 1.0).any()):
            probs = _top_p_filter(probs, top_p)
        shared = [j for j, i in enumerate(sampled) if rows[i].generator is None]
        drawn = torch.empty(len(sampled), dtype=torch.long, device=logits.device)
        if shared:
            sel = torch.tensor(shared, device=logits.device)
            drawn[sel] = torch.multinomial(probs.index_select(0, sel), 1).squeeze(-1)
        for j, i in enumerate(sampled):
            gen: Any = rows[i].generator
            if gen is not None:
                drawn[j] = torch.multinomial(probs[j : j + 1], 1, generator=gen).squeeze(-1)
        tokens[idx] = drawn
    return tokens.tolist()
