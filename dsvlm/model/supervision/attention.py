"""MoE cross-attention: one K/V branch per condition, mixed by a per-layer router (DS-VLM).

Installed as diffusers attention processors on the UNet's cross-attention (`attn2`) layers only. The query
is shared. Branch 0 uses the layer's original `to_k`/`to_v` on the first condition (the connector tokens
when enabled, replacing SD's text embedding); each further condition gets its own K/V pair initialised as
a copy of the original one (IP-Adapter style). A router `P = softmax(mean_tokens(Q · W_r))` weights the
branch outputs: `Z = Σ_j P_j Z_j`, then the layer's own `to_out`.

Conditions reach the processors as a tuple passed as `encoder_hidden_states` (the way diffusers' IP-Adapter
hands its extra image tokens through a stock UNet), so condition lengths may differ and need no bookkeeping.

Unrouted (`shared_matched`, the capacity-matched `shared` ablation): the same K/V pairs, every pair reading
all conditions' tokens concatenated, outputs averaged. It has MoE's new K/V parameters (minus the small
routers) and starts, like MoE, exactly as the original cross-attention over the concatenated tokens.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from dsvlm.errors import RecipeError


class MoECrossAttnProcessor(nn.Module):
    """Cross-attention over several conditions with shared Q, per-condition K/V and a learned router
    (`routed`), or every K/V pair over all condition tokens, averaged (not `routed`)."""

    def __init__(self, attn: Attention, n_branches: int, routed: bool = True) -> None:
        super().__init__()
        if n_branches < 1:
            raise ValueError("MoE cross-attention needs at least one condition")
        self.n_branches = n_branches
        self.routed = routed
        self.to_k = nn.ModuleList(_trainable_copy(attn.to_k) for _ in range(n_branches - 1))
        self.to_v = nn.ModuleList(_trainable_copy(attn.to_v) for _ in range(n_branches - 1))
        # Zero init: the router starts from uniform weights, preferring no condition before training.
        self.router = nn.Linear(attn.to_q.out_features, n_branches, bias=False) if routed and n_branches > 1 else None
        if self.router is not None:
            nn.init.zeros_(self.router.weight)

    def route(self, query: torch.Tensor) -> torch.Tensor:
        """Branch weights (batch, n_branches), each row summing to 1, from the unsplit query (batch, tokens, d)."""
        if self.router is None:
            return query.new_full((query.shape[0], self.n_branches), 1 / self.n_branches)
        return torch.softmax(self.router(query).mean(dim=1), dim=-1)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.routed and isinstance(encoder_hidden_states, torch.Tensor):
            encoder_hidden_states = (encoder_hidden_states,) * self.n_branches
        if not isinstance(encoder_hidden_states, tuple) or len(encoder_hidden_states) != self.n_branches:
            raise ValueError(f"MoE cross-attention expects a tuple of {self.n_branches} condition tensors")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        weights = self.route(query)
        head_dim = query.shape[-1] // attn.heads
        query_heads = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        to_k = [attn.to_k, *self.to_k]
        to_v = [attn.to_v, *self.to_v]
        mixed = 0.0
        for j, condition in enumerate(encoder_hidden_states):
            if attn.norm_cross:
                condition = attn.norm_encoder_hidden_states(condition)
            key = to_k[j](condition).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            value = to_v[j](condition).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(query_heads, key, value, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
            mixed = mixed + weights[:, j, None, None].to(out.dtype) * out

        hidden_states = attn.to_out[1](attn.to_out[0](mixed))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _trainable_copy(layer: nn.Linear) -> nn.Linear:
    new = copy.deepcopy(layer)
    new.requires_grad_(True)
    return new


def install_moe(unet: UNet2DConditionModel, n_branches: int, routed: bool = True) -> list[MoECrossAttnProcessor]:
    """Put an MoE processor on every cross-attention (`attn2`) layer; self-attention is left untouched."""
    processors = dict(unet.attn_processors)
    installed = []
    for name in processors:
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            processors[name] = MoECrossAttnProcessor(attn, n_branches, routed)
            installed.append(processors[name])
    if not installed:
        raise RecipeError("the UNet has no cross-attention layers: use CrossAttn* blocks in its config")
    unet.set_attn_processor(processors)
    return installed
