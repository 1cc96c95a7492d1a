"""LoRA on the UNet's attention projections, in plain torch (a weight parametrization, no peft).

`W` stays frozen; the layer computes with `W + (alpha / r) · B A`, where A (r x in) and B (out x r) train
and B starts at zero, so the UNet is unchanged at init.
"""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.nn.utils import parametrize


class LoRADelta(nn.Module):
    """Parametrization `W -> W + scale · B A` of one linear weight."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.lora_down = nn.Parameter(torch.empty(rank, in_features))
        self.lora_up = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))
        self.scale = (alpha or rank) / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_up @ self.lora_down).to(weight.dtype)


def install_lora(unet: UNet2DConditionModel, rank: int, seed: int = 0) -> list[LoRADelta]:
    """Add LoRA of `rank` to to_q/to_k/to_v/to_out of every attention layer (self and cross) of the UNet."""
    deltas = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in unet.modules():
            if not isinstance(module, Attention):
                continue
            for layer in (module.to_q, module.to_k, module.to_v, module.to_out[0]):
                delta = LoRADelta(layer.out_features, layer.in_features, rank)
                parametrize.register_parametrization(layer, "weight", delta)
                deltas.append(delta)
    return deltas
