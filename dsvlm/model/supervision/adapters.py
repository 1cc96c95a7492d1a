"""Adapters: one per condition, mapping its tokens to the UNet's cross-attention width.

`linear` (the paper's choice) maps every token; `qformer` (the paper's adapter ablation) summarises a condition
into a fixed number of learned queries that cross-attend to its tokens, followed by an MLP.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class QFormerAdapter(nn.Module):
    """`queries` learned tokens of width `dim`: one pre-norm cross-attention over the condition, then an MLP."""

    def __init__(self, width: int, dim: int, queries: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.norm_queries = nn.LayerNorm(dim)
        self.norm_condition = nn.LayerNorm(width)
        heads = next(h for h in (8, 4, 2, 1) if dim % h == 0)
        self.attention = nn.MultiheadAttention(dim, heads, kdim=width, vdim=width, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        """(n, tokens, width) -> (n, queries, dim)."""
        queries = self.queries.expand(condition.shape[0], -1, -1)
        tokens = self.norm_condition(condition)
        attended, _ = self.attention(self.norm_queries(queries), tokens, tokens, need_weights=False)
        hidden = queries + attended
        return hidden + self.mlp(self.norm_mlp(hidden))


class ConditionAdapters(nn.Module):
    """`{condition name: adapter(width -> cross_attention_dim)}`, linear or Q-Former style."""

    def __init__(
        self,
        widths: dict[str, int],
        cross_attention_dim: int,
        kind: Literal["linear", "qformer"] = "linear",
        queries: int = 16,
    ) -> None:
        super().__init__()
        self.widths = dict(widths)

        def adapter(width: int) -> nn.Module:
            if kind == "qformer":
                return QFormerAdapter(width, cross_attention_dim, queries)
            return nn.Linear(width, cross_attention_dim)

        self.layers = nn.ModuleDict({name: adapter(width) for name, width in widths.items()})

    def forward(self, conditions: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The adapted conditions, in the adapters' order (the order of the MoE branches)."""
        missing = [name for name in self.layers if name not in conditions]
        if missing:
            raise KeyError(f"conditions missing: {missing} (given: {list(conditions)})")
        return [layer(conditions[name]) for name, layer in self.layers.items()]
