"""Frozen weights held in 16 bits under a bf16/fp16 stage: the same results in half the memory.

Autocast runs Linear and convolution layers in the stage's 16-bit type and casts their fp32 weights on every call,
so a frozen weight held in 16 bits gives the same output. Two rules, by who owns the weight:
- the frozen pretrained diffusion model (never saved): held in the stage's type (`DiffusionSupervision`);
- the VLM (saved with the stage output): held only where it is lossless, a weight whose fp32 values a 16-bit type
  represents exactly (an fp16 or bf16 checkpoint loaded as fp32 master weights, e.g. Vicuna's), and written back
  as fp32 by `save_model`. A frozen 7B LLM then takes 13.5 GB instead of 27.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

# The modules autocast runs in its lower precision (on CPU and CUDA alike).
LOWER_PRECISION_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
HALF_TYPES = (torch.bfloat16, torch.float16)


def frozen_lower_precision_layers(
    module: nn.Module, kinds: tuple[type[nn.Module], ...] = LOWER_PRECISION_MODULES
) -> Iterator[tuple[str, dict[str, nn.Parameter]]]:
    """(qualified name, {parameter name: parameter}) of each frozen layer of `kinds` in `module`, except layers with
    a parameter shared with any other kind of module (an LM head tied to the token embeddings: the embedding's
    output would change)."""
    shared = {id(p) for m in module.modules() if not isinstance(m, kinds) for p in m.parameters(recurse=False)}
    for name, layer in module.named_modules():
        params = dict(layer.named_parameters(recurse=False))
        if isinstance(layer, kinds) and not any(p.requires_grad or id(p) in shared for p in params.values()):
            yield name, params


def hold_in(params: Iterable[nn.Parameter], dtype: torch.dtype) -> int:
    """Cast the parameters to `dtype` in place; returns how many elements were cast."""
    cast = 0
    for param in params:
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += param.numel()
    return cast


def hold_frozen_vlm_weights(vlm: nn.Module, stage_dtype: torch.dtype) -> int:
    """The VLM's frozen Linear layers held losslessly in 16 bits (see the module docstring): each layer whose weight
    and bias a 16-bit type holds exactly, the stage's type first. Not its patch embedding (a convolution): CLIP and
    SigLIP cast the pixels to that weight's type before autocast would."""
    candidates = (stage_dtype, *(t for t in HALF_TYPES if t != stage_dtype))
    cast = 0
    for _, params in frozen_lower_precision_layers(vlm, (nn.Linear,)):
        exact = (t for t in candidates if all(torch.equal(p.data.to(t).float(), p.data) for p in params.values()))
        dtype = next(exact, None)
        if dtype is not None:
            cast += hold_in(params.values(), dtype)
    return cast


def full_precision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VLM state dict with its 16-bit-held tensors back in fp32 (dsvlm's master weights are all fp32)."""
    return {k: v.float() if v.dtype in HALF_TYPES else v for k, v in state.items()}
