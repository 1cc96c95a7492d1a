"""The VAE's side of the branch: its input convention, the one latent-encoding formula, and its fingerprint.

The training branch encodes with these, and so does the latent cache (`dsvlm.data.latents`), so a cached latent
equals the one training would compute.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from PIL import Image


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 over the VAE's config (public keys) and every weight (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    # Keys starting with "_" (_name_or_path, _diffusers_version) don't change the latents.
    config = {k: v for k, v in dict(getattr(vae, "config", {})).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def vae_input(image: Image.Image, resolution: int) -> torch.Tensor:
    """The VAE's input for one image already made square by its `SquareGeometry`: RGB, resized to resolution x
    resolution (bicubic), [3, R, R] in [-1, 1]. Training without the cache must encode with exactly this."""
    image = image.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


@torch.no_grad()
def encode(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The UNet-space latents of a [B, 3, R, R] batch in [-1, 1]: (posterior mean - shift) x scale, float32 on the
    VAE's device. The only encoding formula: the cache and the training branch both use it."""
    param = next(vae.parameters())
    posterior = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    return ((posterior.mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).float()
