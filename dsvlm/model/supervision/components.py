"""The diffusion model's parts: UNet, VAE (or none in pixel space) and noise schedule.

Each comes from the recipe's `pretrained` diffusers directory / hub repo (subfolders `unet/`, `vae/`,
`scheduler/`) or from an inline config. Stable Diffusion's text encoder is never loaded: the VLM's features
replace its embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from dsvlm.errors import RecipeError
from dsvlm.recipe.schema import DiffusionConfig

M = TypeVar("M", bound=torch.nn.Module)


def load_unet(cfg: DiffusionConfig, seed: int = 0) -> UNet2DConditionModel:
    """The denoiser: inline `unet_config` (seeded random init) or `pretrained`'s `unet/`."""
    if cfg.unet_config is not None:
        return _seeded(seed, lambda: _from_config(UNet2DConditionModel, cfg.unet_config, "unet_config"))
    return _pretrained(UNet2DConditionModel, cfg, "unet")


def load_vae(cfg: DiffusionConfig, seed: int = 0) -> AutoencoderKL | None:
    """The autoencoder whose latent space the UNet denoises; None in pixel space (identity autoencoder)."""
    if cfg.pixel_space:
        return None
    if cfg.vae_config is not None:
        return _seeded(seed + 1, lambda: _from_config(AutoencoderKL, cfg.vae_config, "vae_config"))
    return _pretrained(AutoencoderKL, cfg, "vae")


def load_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The training noise schedule: `pretrained`'s `scheduler/`, else a default DDPM of `num_train_timesteps`."""
    if cfg.pretrained is not None:
        try:
            return DDPMScheduler.from_pretrained(cfg.pretrained, subfolder="scheduler")
        except (OSError, ValueError) as exc:
            raise RecipeError(f"supervision.diffusion.pretrained {cfg.pretrained!r}: no scheduler/ ({exc})") from exc
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps)


def _seeded(seed: int, build: Callable[[], M]) -> M:
    # A private RNG stream: building the branch must not shift the VLM's or the data order's randomness.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _from_config(cls: type[M], config: dict[str, Any], field: str) -> M:
    try:
        return cls(**config)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"supervision.diffusion.{field} is not a valid {cls.__name__} config: {exc}") from exc


def _pretrained(cls: type[M], cfg: DiffusionConfig, subfolder: str) -> M:
    if cfg.pretrained is None:
        raise RecipeError(
            f"supervision.diffusion needs `pretrained` (a diffusers directory with {subfolder}/) or an inline "
            f"{subfolder}_config" + (", or pixel_space: true" if subfolder == "vae" else "")
        )
    try:
        return cls.from_pretrained(cfg.pretrained, subfolder=subfolder, torch_dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise RecipeError(
            f"supervision.diffusion.pretrained {cfg.pretrained!r}: cannot load {subfolder}/ ({exc})"
        ) from exc
