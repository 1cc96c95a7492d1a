"""LoRA through peft: on the diffusion branch's UNet (diffusers' `add_adapter`) and on the VLM's LLM (a stage's
`llm_lora`). The adapters live inside the plain diffusers / transformers models (no PeftModel wrapper), so the
rest of dsvlm keeps seeing a UNet2DConditionModel and a LlavaForConditionalGeneration.

The LLM's adapter goes in through peft's own functional API rather than transformers' `add_adapter`: transformers
5.24 refuses peft releases older than 0.22, and diffusers' integration works from 0.17.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from peft import LoraConfig, PeftConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlavaForConditionalGeneration

from dsvlm.errors import RecipeError
from dsvlm.recipe.schema import LLMLoraConfig

UNET_LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")
# peft's own file name and key prefix (what PeftModel.save_pretrained writes): peft users can load the folder.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def is_lora_key(name: str) -> bool:
    """Parameter / state-dict names peft gives adapter weights (`...q_proj.lora_A.default.weight`)."""
    return ".lora_" in name


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in module.named_parameters() if is_lora_key(name)]


@contextlib.contextmanager
def _keeping_requires_grad(module: nn.Module) -> Iterator[None]:
    """peft marks only the adapters trainable when it injects them; what trains stays the freeze step's choice."""
    before = {id(p): p.requires_grad for p in module.parameters()}
    yield
    for p in module.parameters():
        p.requires_grad_(before.get(id(p), True))  # new (adapter) parameters train


def add_unet_lora(unet: UNet2DConditionModel, rank: int, seed: int) -> None:
    """LoRA of `rank` (alpha = rank: scale 1) on to_q/to_k/to_v/to_out of every attention layer (self and cross).
    B starts at zero, so the UNet is unchanged at init. Only the attention layers' own projections: the extra K/V
    of MoE processors are named after them but are not targets."""
    targets = [
        f"{name}.{layer}"
        for name, module in unet.named_modules()
        if isinstance(module, Attention)
        for layer in UNET_LORA_LAYERS
    ]
    with _keeping_requires_grad(unet), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))


def _llm_peft_config(config: LLMLoraConfig) -> LoraConfig:
    # A regex (peft full-matches it against module names) that keeps the vision tower's q/k/v_proj out.
    names = "|".join(re.escape(name) for name in config.target_modules)
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        bias="none",
        target_modules=rf"model\.language_model\..*\.({names})",
    )


def add_llm_lora(vlm: LlavaForConditionalGeneration, config: LLMLoraConfig, seed: int) -> None:
    """Inject fresh LoRA adapters (B = 0: the VLM is unchanged at init) into the LLM's target layers."""
    try:
        with _keeping_requires_grad(vlm), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject_adapter_in_model(_llm_peft_config(config), vlm)
    except ValueError as exc:  # peft: none of the target modules exists in the model
        raise RecipeError(f"llm_lora.target_modules {config.target_modules} do not fit the LLM: {exc}") from exc


def has_llm_lora(vlm: LlavaForConditionalGeneration) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in vlm.model.language_model.modules())


def base_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA'd model's state dict as the plain model's: adapters dropped, `x.base_layer.weight` -> `x.weight`."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if not is_lora_key(k)}


def save_llm_lora(vlm: LlavaForConditionalGeneration, directory: Path, state: dict[str, torch.Tensor]) -> None:
    """The adapter of `vlm` (weights taken from `state`, its full state dict) as a peft adapter folder."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = get_peft_model_state_dict(vlm, state_dict=state)
    save_file({PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in weights.items()}, directory / ADAPTER_WEIGHTS)
    vlm.peft_config["default"].save_pretrained(str(directory))


def save_plain_vlm(vlm: LlavaForConditionalGeneration, directory: Path, state: dict[str, torch.Tensor]) -> None:
    """Save `state` (a LoRA'd VLM's full state dict) as the plain LLaVA it is based on: a twin built on the meta
    device takes the base tensors by reference, so nothing is copied."""
    with torch.device("meta"):
        plain = type(vlm)(vlm.config)
    plain.load_state_dict(base_state(state), strict=True, assign=True)
    plain.generation_config = vlm.generation_config
    plain.save_pretrained(directory, safe_serialization=True)


def load_llm_lora(vlm: LlavaForConditionalGeneration, directory: Path) -> None:
    """Inject the adapter `save_llm_lora` wrote into `vlm` (unmerged; weights checked to match exactly)."""
    config = PeftConfig.from_pretrained(str(directory))
    inject_adapter_in_model(config, vlm)
    vlm.train(vlm.training)  # the new layers (their dropout) follow the model's mode
    weights = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(directory / ADAPTER_WEIGHTS).items()}
    result = set_peft_model_state_dict(vlm, weights)
    missing = [k for k in result.missing_keys if is_lora_key(k)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the LoRA adapter in {directory} does not fit the model: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )


def merge_llm_lora(vlm: LlavaForConditionalGeneration) -> None:
    """Fold each adapter into its base weight (W + alpha/r · B A) and put the plain layer back: `vlm` is a plain
    LLaVA again (what peft's `merge_and_unload` does for a PeftModel, here for adapters injected in place)."""
    for name, module in list(vlm.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(vlm.get_submodule(parent), child, module.get_base_layer())
    if hasattr(vlm, "peft_config"):
        del vlm.peft_config
