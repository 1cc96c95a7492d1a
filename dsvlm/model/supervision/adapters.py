"""Linear adapters: one per condition, mapping its width to the UNet's cross-attention width."""

from __future__ import annotations

import torch
from torch import nn


class ConditionAdapters(nn.Module):
    """`{condition name: nn.Linear(width, cross_attention_dim)}`; the paper's ablation preferred linear."""

    def __init__(self, widths: dict[str, int], cross_attention_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({name: nn.Linear(width, cross_attention_dim) for name, width in widths.items()})

    def forward(self, conditions: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The adapted conditions, in the adapters' order (the order of the MoE branches)."""
        missing = [name for name in self.layers if name not in conditions]
        if missing:
            raise KeyError(f"conditions missing: {missing} (given: {list(conditions)})")
        return [layer(conditions[name]) for name, layer in self.layers.items()]
