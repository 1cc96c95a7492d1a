"""The diffusion supervision branch: reconstruct the input image from the VLM's features.

One noising step per sample: draw t and ε from the sample's own seed, noise the VAE latent, predict ε with
the condition-driven UNet, form x̂0, decode with the frozen VAE and compare with the image. The loss reaches
the vision encoder and the connector through the conditions, skipping the LLM. Nothing here is needed at
inference: the VLM never references this module.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from torch import nn

from dsvlm.errors import RecipeError
from dsvlm.model.lora import add_unet_lora, lora_parameters
from dsvlm.model.precision import frozen_lower_precision_layers, hold_in
from dsvlm.model.supervision.adapters import ConditionAdapters
from dsvlm.model.supervision.attention import MoECrossAttnProcessor, install_moe
from dsvlm.model.supervision.components import load_scheduler, load_unet, load_vae
from dsvlm.model.supervision.losses import (
    VGG16Features,
    eps_mse_loss,
    mae_loss,
    perceptual_loss,
    ssim_loss,
    vae_features,
)
from dsvlm.model.supervision.vae import encode as encode_latents
from dsvlm.recipe.schema import SupervisionConfig

CONNECTOR = "connector"
TIMESTEP_BUCKETS = 4  # reconstruction-loss logging: equal slices of the noise schedule


def timestep_bucket(timesteps: torch.Tensor, n_timesteps: int) -> torch.Tensor:
    """The bucket index of each timestep: TIMESTEP_BUCKETS equal slices of the noise schedule."""
    return timesteps * TIMESTEP_BUCKETS // n_timesteps


def timestep_buckets(n_timesteps: int) -> list[tuple[int, int]]:
    """Inclusive (low, high) timestep range of each bucket, as `timestep_bucket` assigns them."""
    edges = [-(-i * n_timesteps // TIMESTEP_BUCKETS) for i in range(TIMESTEP_BUCKETS + 1)]  # ceil(i * n / B)
    return [(edges[i], edges[i + 1] - 1) for i in range(TIMESTEP_BUCKETS)]


def vision_condition(layer: int) -> str:
    """Condition name of the vision encoder's hidden state `layer` (1-based, as in the recipe)."""
    return f"vision_{layer}"


class DiffusionSupervision(nn.Module):
    """UNet (+ frozen VAE) conditioned on vision-layer and connector features through linear adapters."""

    def __init__(self, config: SupervisionConfig, vision_hidden_size: int, llm_hidden_size: int, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        diffusion = config.diffusion
        self.unet = load_unet(diffusion, seed)
        self.vae = load_vae(diffusion, seed)
        self.scheduler = load_scheduler(diffusion)
        self._check_channels()
        self.register_buffer(
            "alphas_cumprod", self.scheduler.alphas_cumprod.to(torch.float32).clone(), persistent=False
        )
        hi = min(config.timestep_range[1], len(self.alphas_cumprod) - 1)
        self.timestep_range = (min(config.timestep_range[0], hi), hi)

        widths = ({CONNECTOR: llm_hidden_size} if config.connector else {}) | {
            vision_condition(layer): vision_hidden_size for layer in config.vision_layers
        }
        cross_dim = self.unet.config.cross_attention_dim
        if not isinstance(cross_dim, int):
            raise RecipeError("the UNet's cross_attention_dim must be one integer for all blocks")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2)
            self.adapters = ConditionAdapters(widths, cross_dim, config.adapter, config.adapter_queries)

        # Frozen before the new modules exist, so these stay trainable whatever the UNet's setting.
        if self.vae is not None:
            self.vae.requires_grad_(False)
        if config.freeze_unet:
            self.unet.requires_grad_(False)
        self.moe: list[MoECrossAttnProcessor] = (
            install_moe(self.unet, len(widths), routed=config.cross_attention == "moe")
            if config.cross_attention in ("moe", "shared_matched")
            else []
        )
        if config.lora_rank:
            add_unet_lora(self.unet, config.lora_rank, seed + 3)

        self.perceptual = None
        if "perceptual" in config.loss and config.perceptual_network == "vgg16":
            self.perceptual = VGG16Features(config.perceptual_weights or "")
        self._pristine = self._pristine_keys()

    def _check_channels(self) -> None:
        expected = 3 if self.vae is None else self.vae.config.latent_channels
        space = "pixel space (RGB)" if self.vae is None else "the VAE's latent space"
        if self.unet.config.in_channels != expected or self.unet.config.out_channels != expected:
            raise RecipeError(
                f"the UNet has in/out channels {self.unet.config.in_channels}/{self.unet.config.out_channels} "
                f"but {space} has {expected}"
            )

    def _pristine_keys(self) -> set[str]:
        """State keys that are exactly their pretrained source, frozen: reloaded from there, never saved."""
        keys = set()
        diffusion = self.config.diffusion
        if diffusion.unet_config is None and self.config.freeze_unet:
            keys |= {f"unet.{k}" for k in self.unet.state_dict() if ".processor." not in k and "lora_" not in k}
        if self.vae is not None and diffusion.vae_config is None:
            keys |= {f"vae.{k}" for k in self.vae.state_dict()}
        if self.perceptual is not None:
            keys |= {f"perceptual.{k}" for k in self.perceptual.state_dict()}
        return keys

    def hold_frozen_in(self, dtype: torch.dtype) -> int:
        """Cast the frozen pretrained Linear/Conv weights of the UNet and VAE to `dtype` (the stage's autocast
        precision); returns how many parameters were cast.

        Autocast runs exactly these modules in `dtype`, casting fp32 weights on every call: held in `dtype`, they
        give the same results in half the memory (1.9 GB at SD 1.5 size). Norm layers stay fp32 (autocast leaves
        them there), and trainable or saved weights (new K/V, LoRA, an inline-config UNet) are never cast.
        """
        cast = 0
        for prefix, part in (("unet", self.unet), ("vae", self.vae)):
            if part is None:
                continue
            for name, params in frozen_lower_precision_layers(part):
                if all(f"{prefix}.{name}.{key}" in self._pristine for key in params):
                    cast += hold_in(params.values(), dtype)
        return cast

    @property
    def condition_names(self) -> list[str]:
        """The conditions `forward` expects, in MoE branch order (branch 0 takes the original K/V)."""
        return list(self.adapters.layers)

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters of the modules DS-VLM adds (adapters, new K/V, routers, LoRA), for their own lr."""
        modules: list[nn.Module] = [self.adapters, *self.moe]
        return [p for module in modules for p in module.parameters()] + lora_parameters(self.unet)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold: everything except the frozen pretrained UNet/VAE/VGG weights."""
        return {k: v for k, v in self.state_dict().items() if k not in self._pristine}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what `trainable_state_dict` saved; the pristine rest must already be in place."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in self._pristine]
        if missing or unexpected:
            raise ValueError(
                f"supervision weights do not match the recipe: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the UNet's input space: scaled VAE latent means (identity in pixel space).

        The latent cache must store exactly this, so cached and on-the-fly training agree.
        """
        if self.vae is None:
            return images
        return encode_latents(self.vae, images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `encode`, differentiable (the VAE is frozen, not detached)."""
        if self.vae is None:
            return latents
        vae_config = self.vae.config
        return self.vae.decode(latents / vae_config.scaling_factor + (vae_config.shift_factor or 0.0)).sample

    def forward(
        self,
        conditions: dict[str, torch.Tensor],
        images: torch.Tensor | None,
        latents: torch.Tensor | None,
        seeds: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses `{"loss": weighted total (n,), "<loss name>": term (n,), "timesteps": t (n,)}`.

        `conditions` holds one (n, tokens, width) tensor per `condition_names`; `images` (n, 3, R, R) in
        [-1, 1] are the targets (needed by image-space losses and when `latents` is None); `latents` are
        precomputed `encode(images)`; `seeds` (n,) fix each sample's timestep and noise.
        """
        if latents is None:
            if images is None:
                raise ValueError("the diffusion branch needs images or latents")
            latents = self.encode(images)
        latents = latents.float()
        timesteps, noise = self._draw(seeds, latents.shape[1:], latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        alpha = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=self._encoder_states(conditions)).sample
        eps, x0 = self._eps_and_x0(prediction.float(), noisy, alpha)

        terms: dict[str, torch.Tensor] = {}
        if "eps_mse" in self.config.loss:
            terms["eps_mse"] = eps_mse_loss(eps, noise)
        if any(name != "eps_mse" for name in self.config.loss):
            if images is None:
                raise ValueError("image-space reconstruction losses need the images, not only latents")
            reconstruction = self.decode(self._clamp(x0)).float()
            target = images.float()
            if "perceptual" in self.config.loss:
                terms["perceptual"] = self._perceptual(reconstruction, target)
            if "mae" in self.config.loss:
                terms["mae"] = mae_loss(reconstruction, target)
            if "ssim" in self.config.loss:
                terms["ssim"] = ssim_loss(reconstruction, target)
        image_weight, eps_weight = self._snr_weights(alpha.flatten())
        total = sum(
            self.config.loss[name] * (eps_weight if name == "eps_mse" else image_weight) * term
            for name, term in terms.items()
        )
        return {"loss": total, **terms, "timesteps": timesteps}

    def _clamp(self, x0: torch.Tensor) -> torch.Tensor:
        clamp = self.config.x0_clamp
        return x0 if clamp is None else x0.clamp(-clamp, clamp)

    def _snr_weights(self, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample weights (of x̂0-space terms, of eps_mse) for the recipe's timestep weighting."""
        if self.config.timestep_weighting == "none":
            ones = torch.ones_like(alpha)
            return ones, ones
        gamma = self.config.min_snr_gamma
        snr = alpha / (1 - alpha).clamp_min(1e-12)
        capped = snr.clamp(max=gamma)
        return capped / gamma, capped / snr.clamp_min(1e-12)

    def _perceptual(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.perceptual is not None:
            return perceptual_loss(self.perceptual, reconstruction, target, self.perceptual.tap_weights())
        if self.vae is None:  # the recipe schema refuses this combination; guard direct construction too
            raise RecipeError("the perceptual loss over vae_features needs a VAE")
        vae = self.vae
        return perceptual_loss(lambda x: vae_features(vae, x.to(vae.dtype)), reconstruction, target)

    def _encoder_states(self, conditions: dict[str, torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        adapted = self.adapters(conditions)
        # MoE processors take the conditions apart; `shared*` feed all tokens to every K/V of the cross-attention.
        return tuple(adapted) if self.config.cross_attention == "moe" else torch.cat(adapted, dim=1)

    def _draw(self, seeds: torch.Tensor, shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Timestep and noise of each sample from its own CPU generator: independent of batch layout/device."""
        lo, hi = self.timestep_range
        timesteps, noise = [], []
        for seed in seeds.tolist():
            generator = torch.Generator().manual_seed(int(seed))
            timesteps.append(torch.randint(lo, hi + 1, (1,), generator=generator))
            noise.append(torch.randn(shape, generator=generator))
        return torch.cat(timesteps).to(device), torch.stack(noise).to(device)

    def _eps_and_x0(
        self, prediction: torch.Tensor, noisy: torch.Tensor, alpha: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂0) from the UNet output, whatever the scheduler's prediction type.

        Written out because diffusers forms x̂0 only inside `scheduler.step`, which takes one timestep for the
        whole batch (each sample here has its own) and also draws the previous sample.
        """
        kind = self.scheduler.config.prediction_type
        a, s = alpha.sqrt(), (1 - alpha).sqrt()
        if kind == "epsilon":
            return prediction, (noisy - s * prediction) / a
        if kind == "v_prediction":
            return a * prediction + s * noisy, a * noisy - s * prediction
        if kind == "sample":
            return (noisy - a * prediction) / s.clamp_min(1e-8), prediction
        raise RecipeError(f"unsupported scheduler prediction_type {kind!r}")

    @torch.no_grad()
    def denoise(
        self, conditions: dict[str, torch.Tensor], images: torch.Tensor, timestep: int, seed: int = 0
    ) -> torch.Tensor:
        """x̂0 from one UNet call on the images noised to `timestep`: what the training loss sees, in [-1, 1]."""
        latents = self.encode(images).float()
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents.device)
        t = torch.full((latents.shape[0],), timestep, device=latents.device, dtype=torch.long)
        noisy = self.scheduler.add_noise(latents, noise, t)
        alpha = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        prediction = self.unet(noisy, t, encoder_hidden_states=self._encoder_states(conditions)).sample
        return self.decode(self._clamp(self._eps_and_x0(prediction.float(), noisy, alpha)[1])).clamp(-1, 1)

    @torch.no_grad()
    def sample(self, conditions: dict[str, torch.Tensor], steps: int | None = None, seed: int = 0) -> torch.Tensor:
        """Images in [-1, 1] generated from the conditions alone by DDIM (previews of what the branch sees)."""
        n = next(iter(conditions.values())).shape[0]
        device = self.alphas_cumprod.device
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(steps or self.config.sampler_steps, device=device)
        size = self.config.resolution
        if self.vae is not None:
            size //= 2 ** (len(self.vae.config.block_out_channels) - 1)
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(n, self.unet.config.in_channels, size, size, generator=generator).to(device)
        x = x * ddim.init_noise_sigma
        states = self._encoder_states(conditions)
        for t in ddim.timesteps:
            prediction = self.unet(ddim.scale_model_input(x, t), t, encoder_hidden_states=states).sample
            x = ddim.step(prediction, t, x).prev_sample
        return self.decode(x).clamp(-1, 1)
