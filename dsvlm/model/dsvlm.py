"""DS-VLM: a plain transformers LLaVA plus the removable diffusion supervision branch.

The branch's conditions come from the SAME forward pass that feeds the LLM: forward hooks on the vision
encoder's layers and on the projector copy their outputs while a supervised forward runs. The LLaVA forward
itself stays the standard one, so with the branch off (or λ = 0) loss and logits are those of plain LLaVA.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from dsvlm.errors import DsvlmError, RecipeError
from dsvlm.model.collate import IGNORE_INDEX
from dsvlm.model.lora import add_llm_lora, has_llm_lora, load_llm_lora, merge_llm_lora, save_llm_lora, save_plain_vlm
from dsvlm.model.precision import HALF_TYPES, full_precision_state
from dsvlm.model.supervision.branch import (
    CONNECTOR,
    TIMESTEP_BUCKETS,
    DiffusionSupervision,
    timestep_bucket,
    vision_condition,
)
from dsvlm.model.vlm import build_vlm
from dsvlm.recipe.schema import LLMLoraConfig, Recipe

log = logging.getLogger(__name__)

VLM_DIR = "vlm"
LLM_LORA_DIR = "llm_lora"  # a LoRA stage's adapter (peft format), beside the base weights in VLM_DIR
SUPERVISION_DIR = "supervision"
SUPERVISION_WEIGHTS = "weights.safetensors"
SUPERVISION_INFO = "supervision.json"


@dataclass
class DSVLMOutput:
    """Losses of one forward: `loss = text_loss + λ·rec_loss`. The parts stay attached (so each can be
    back-propagated alone); detach them for logging. `rec_buckets` (detached, (TIMESTEP_BUCKETS, 2)): the summed
    per-image reconstruction loss and the image count of each timestep bucket (None without the branch)."""

    loss: torch.Tensor
    text_loss: torch.Tensor
    rec_loss: torch.Tensor
    n_text_tokens: int
    n_rec: int
    logits: torch.Tensor
    rec_buckets: torch.Tensor | None = None


class DSVLM(nn.Module):
    """`.vlm` (LlavaForConditionalGeneration), `.processor`, `.supervision` (DiffusionSupervision or None)."""

    def __init__(
        self, vlm: LlavaForConditionalGeneration, processor: LlavaProcessor, supervision: DiffusionSupervision | None
    ) -> None:
        super().__init__()
        self.vlm = vlm
        self.supervision = supervision
        # A plain attribute, not a module: the processor holds no weights and must not enter state dicts.
        self.processor = processor
        self._captured: dict[str, torch.Tensor] | None = None
        # What FSDP's transformer auto-wrap shards as units (accelerate reads this attribute).
        self._no_split_modules = sorted(
            {
                type(encoder_layers(vlm.model.vision_tower)[0]).__name__,
                type(vlm.model.language_model.layers[0]).__name__,
            }
        )
        if supervision is not None:
            self._install_hooks(supervision)

    def _install_hooks(self, supervision: DiffusionSupervision) -> None:
        layers = encoder_layers(self.vlm.model.vision_tower)
        too_deep = [layer for layer in supervision.config.vision_layers if layer > len(layers)]
        if too_deep:
            raise RecipeError(
                f"supervision.vision_layers {too_deep} exceed the vision encoder's depth ({len(layers)} layers)"
            )
        for layer in supervision.config.vision_layers:
            # Hidden state k (1-based, as LLaVA's `hidden_states[k]`) is the output of encoder layer k - 1.
            layers[layer - 1].register_forward_hook(self._capture_hook(vision_condition(layer)))
        if supervision.config.connector:
            self.vlm.model.multi_modal_projector.register_forward_hook(self._capture_hook(CONNECTOR))

    def _capture_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._captured is not None:
                self._captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    @contextlib.contextmanager
    def _capturing(self, enabled: bool) -> Iterator[dict[str, torch.Tensor]]:
        captured: dict[str, torch.Tensor] = {}
        self._captured = captured if enabled else None
        try:
            yield captured
        finally:
            self._captured = None

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        supervise: bool = True,
        text_normalizer: float | None = None,
        rec_normalizer: float | None = None,
    ) -> DSVLMOutput:
        """Text loss (summed next-token CE / `text_normalizer`, default this batch's label-token count) plus
        λ · reconstruction loss (summed per-image loss / `rec_normalizer`, default this batch's count)."""
        branch = self.supervision if supervise else None
        if branch is not None and (branch.config.weight == 0 or "pixel_values" not in batch):
            branch = None
        with self._capturing(branch is not None) as captured:
            logits = self.vlm(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch.get("pixel_values"),
            ).logits
        labels = batch["labels"][:, 1:]
        n_text = int((labels != IGNORE_INDEX).sum())
        text_sum = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        text_loss = text_sum / (text_normalizer if text_normalizer is not None else max(n_text, 1))

        rec_loss = logits.new_zeros((), dtype=torch.float32)
        n_rec = 0
        rec_buckets = None
        if branch is not None:
            per_image, timesteps = self._reconstruction(branch, batch, captured)
            n_rec = len(per_image)
            rec_loss = per_image.sum() / (rec_normalizer if rec_normalizer is not None else max(n_rec, 1))
            loss = text_loss + branch.config.weight * rec_loss
            rec_buckets = _bucket_sums(per_image.detach(), timesteps, len(branch.alphas_cumprod))
        else:
            loss = text_loss
        return DSVLMOutput(loss, text_loss, rec_loss, n_text, n_rec, logits, rec_buckets)

    def _reconstruction(
        self, branch: DiffusionSupervision, batch: dict[str, torch.Tensor], captured: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image reconstruction loss and timestep of the first `reconstruct_per_batch` imaged samples."""
        if "rec_pixels" not in batch and "latents" not in batch:
            raise ValueError("a supervised batch needs rec_pixels (Collator rec_resolution) or latents")
        n_images = batch["pixel_values"].shape[0]
        k = min(n_images, branch.config.reconstruct_per_batch or n_images)
        seeds = batch["noise_seeds"] if "noise_seeds" in batch else batch["sample_index"]
        seeds = seeds[batch["image_mask"]][:k]
        images = batch["rec_pixels"][:k] if "rec_pixels" in batch else None
        latents = batch["latents"][:k] if "latents" in batch else None
        conditions = {name: captured[name][:k] for name in branch.condition_names}
        out = branch(conditions, images, latents, seeds)
        return out["loss"], out["timesteps"]

    @torch.no_grad()
    def reconstruct(
        self, batch: dict[str, torch.Tensor], n: int, steps: int | None = None, timestep: int = 250
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Previews of the first `n` images, each (n, 3, R, R) in [0, 1]: the originals, their one-step
        reconstruction from noise level `timestep` (what the loss sees), and DDIM samples from pure noise
        conditioned on the visual features alone (what the features hold)."""
        branch = self.supervision
        if branch is None:
            raise ValueError("this model has no diffusion branch to reconstruct with")
        if "rec_pixels" not in batch:
            raise ValueError("reconstruct needs rec_pixels (Collator rec_resolution)")
        with self._capturing(True) as captured:
            self.vlm(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
            )
        n = min(n, batch["pixel_values"].shape[0])
        conditions = {name: captured[name][:n] for name in branch.condition_names}
        originals = batch["rec_pixels"][:n].float()
        timestep = min(timestep, branch.timestep_range[1])
        one_step = branch.denoise(conditions, originals, timestep)
        sampled = branch.sample(conditions, steps)
        return tuple((x.float() + 1) / 2 for x in (originals, one_step, sampled))


def _bucket_sums(per_image: torch.Tensor, timesteps: torch.Tensor, n_timesteps: int) -> torch.Tensor:
    """(TIMESTEP_BUCKETS, 2): per timestep bucket, the summed loss and the number of images. Scattered, not
    masked: boolean indexing would synchronise with the device on every micro-batch."""
    bucket = timestep_bucket(timesteps, n_timesteps)
    sums = per_image.new_zeros(TIMESTEP_BUCKETS, 2, dtype=torch.float32)
    sums[:, 0].index_add_(0, bucket, per_image.float())
    sums[:, 1].index_add_(0, bucket, torch.ones_like(per_image, dtype=torch.float32))
    return sums


def encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    """The transformer layers of a CLIP / SigLIP vision tower (flat in transformers 5, nested before)."""
    for path in ("encoder.layers", "vision_model.encoder.layers"):
        with contextlib.suppress(AttributeError):
            return vision_tower.get_submodule(path)
    raise RecipeError(f"{type(vision_tower).__name__} is not a CLIP/SigLIP-style vision tower")


def _branch(recipe: Recipe, vlm: LlavaForConditionalGeneration) -> DiffusionSupervision | None:
    if not recipe.supervision.enabled:
        return None
    return DiffusionSupervision(
        recipe.supervision,
        vision_hidden_size=vlm.config.vision_config.hidden_size,
        llm_hidden_size=vlm.config.text_config.hidden_size,
        seed=recipe.run.seed,
    )


def build_model(
    recipe: Recipe, init: Path | None = None, words: Iterable[str] | None = None, llm_lora: LLMLoraConfig | None = None
) -> DSVLM:
    """A fresh DS-VLM from the recipe, or the one `save_model` wrote to `init` (an earlier LoRA stage's adapter
    merged); with `llm_lora`, fresh LoRA adapters in its LLM. `words`: the vocabulary of an inline LLM's
    word-level tokenizer (see `build_vlm`)."""
    if init is not None:  # a load error is the caller's to explain (the stage it was meant to start)
        model = load_model(init, recipe)
    else:
        vlm, processor = build_vlm(recipe.model, seed=recipe.run.seed, words=words)
        model = DSVLM(vlm, processor, _branch(recipe, vlm))
    if llm_lora is not None:
        add_llm_lora(model.vlm, llm_lora, seed=recipe.run.seed + 4)
    return model


def save_model(model: DSVLM, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`out_dir/vlm/`: a standard transformers LLaVA directory (safetensors) with its processor; with LoRA in the
    LLM, the base weights there and the adapter in `out_dir/llm_lora/` (a peft adapter folder).
    `out_dir/supervision/`: the branch's weights except frozen pretrained parts (reloaded from their source).
    `state_dict`: the model's full state dict when `model` holds only shards (FSDP gathers it on every rank)."""
    out_dir = Path(out_dir)
    vlm_state = _sub_state(state_dict, "vlm.") if state_dict is not None else None
    if any(p.dtype in HALF_TYPES for p in model.vlm.parameters()):  # frozen weights held in 16 bits, losslessly
        vlm_state = full_precision_state(vlm_state if vlm_state is not None else model.vlm.state_dict())
    if has_llm_lora(model.vlm):  # the base weights as a plain LLaVA, the adapter beside them
        vlm_state = vlm_state if vlm_state is not None else model.vlm.state_dict()
        save_plain_vlm(model.vlm, out_dir / VLM_DIR, vlm_state)
        save_llm_lora(model.vlm, out_dir / LLM_LORA_DIR, vlm_state)
    else:
        model.vlm.save_pretrained(out_dir / VLM_DIR, safe_serialization=True, state_dict=vlm_state)
    model.processor.save_pretrained(out_dir / VLM_DIR)
    branch = model.supervision
    if branch is None:
        return
    target = out_dir / SUPERVISION_DIR
    target.mkdir(parents=True, exist_ok=True)
    trainable = branch.trainable_state_dict()
    if state_dict is not None:
        full = _sub_state(state_dict, "supervision.")
        trainable = {k: full[k] for k in trainable}
    state = {k: v.detach().contiguous().cpu() for k, v in trainable.items()}
    save_file(state, target / SUPERVISION_WEIGHTS)
    info = {
        "conditions": branch.condition_names,
        "cross_attention": branch.config.cross_attention,
        "pretrained": branch.config.diffusion.pretrained,
        "unet_saved": any(k.startswith("unet.") and ".processor." not in k for k in state),
        "vae_saved": any(k.startswith("vae.") for k in state),
        "tensors": len(state),
        "parameters": sum(v.numel() for v in state.values()),
        # Everything strip removes, frozen pretrained parts included: strip reads it instead of building the branch.
        "branch_parameters": sum(p.numel() for p in branch.parameters()),
    }
    (target / SUPERVISION_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_vlm(directory: Path, recipe: Recipe, merge_lora: bool = True) -> DSVLM:
    """Only the VLM of what `save_model` wrote (no branch: nothing of the diffusion model is read or fetched).
    A LoRA stage's adapter is merged into the LLM, or with `merge_lora=False` left in it unmerged."""
    directory = Path(directory)
    vlm_dir = directory / VLM_DIR
    if not (vlm_dir / "config.json").is_file():
        raise FileNotFoundError(f"{directory} holds no saved DS-VLM ({vlm_dir}/config.json missing)")
    model_type = json.loads((vlm_dir / "config.json").read_text()).get("model_type")
    if model_type != "llava":
        raise DsvlmError(f"{vlm_dir} holds a {model_type!r} model, not the LLaVA a DS-VLM stage output holds")
    vlm = LlavaForConditionalGeneration.from_pretrained(
        vlm_dir, dtype=torch.float32, attn_implementation=recipe.model.attn_implementation
    )
    vlm.config.image_aspect_ratio = recipe.model.image_aspect_ratio  # what evaluation will apply
    if (directory / LLM_LORA_DIR).is_dir():
        load_llm_lora(vlm, directory / LLM_LORA_DIR)
        if merge_lora:
            merge_llm_lora(vlm)
    return DSVLM(vlm, AutoProcessor.from_pretrained(vlm_dir), None)


def branch_parameters(directory: Path) -> int:
    """The branch's parameter count as `save_model` recorded it (0 without a branch)."""
    info_file = Path(directory) / SUPERVISION_DIR / SUPERVISION_INFO
    if not info_file.is_file():
        return 0
    info = json.loads(info_file.read_text())
    return int(info.get("branch_parameters", info.get("parameters", 0)))  # older outputs: the saved part only


def load_model(directory: Path, recipe: Recipe) -> DSVLM:
    """The DS-VLM `save_model` wrote; the branch follows the recipe (fresh if the directory has none)."""
    plain = load_vlm(directory, recipe)
    vlm, processor = plain.vlm, plain.processor
    branch = _branch(recipe, vlm)
    weights = directory / SUPERVISION_DIR / SUPERVISION_WEIGHTS
    if branch is not None:
        if weights.is_file():
            branch.load_trainable_state_dict(load_file(weights))
        else:
            log.info("%s has no diffusion branch: starting a fresh one", directory)
    return DSVLM(vlm, processor, branch)
