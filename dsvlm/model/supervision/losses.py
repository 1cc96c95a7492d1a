"""Reconstruction losses, each returning one value per sample (shape (n,)).

Images are in [-1, 1]. `perceptual` is LPIPS-style: unit-normalise each feature vector over channels,
square the difference, sum over channels, average over space, sum over layers. Its feature network is
`vae_features`, the frozen VAE encoder's multi-scale features (always at hand, pretrained wherever the SD VAE
is, no download; feature matching, not calibrated LPIPS: no learned per-channel weights), or VGG16 (the
standard LPIPS network and constants; weights from a local file since nothing can be fetched).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from torch import nn

from dsvlm.errors import RecipeError

# VGG16 `features` as torchvision lays it out (ints: 3x3 conv widths, "M": 2x2 max-pool), so a torchvision
# state dict loads by key. LPIPS reads the ReLU outputs relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_TAPS = (3, 8, 15, 22, 29)
# LPIPS's input scaling: [-1, 1] images to ImageNet statistics.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """VGG16's convolutional stack in plain torch (torchvision is not installable here), frozen."""

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=False)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        for k, i in enumerate(_LPIPS_TAPS):
            self.register_buffer(f"tap_weight_{k}", torch.ones(self.features[i - 1].out_channels))
        self._load(Path(weights))
        self.requires_grad_(False)

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise RecipeError(f"supervision.perceptual_weights: {path} is not a file")
        try:
            state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        except Exception as exc:  # any unreadable file is the same user error
            raise RecipeError(f"supervision.perceptual_weights: cannot read {path}: {exc}") from exc
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        missing, _ = self.features.load_state_dict(features, strict=False)
        if missing:
            raise RecipeError(f"supervision.perceptual_weights: {path} lacks VGG16 features weights {missing[:3]}")
        for k, weights in enumerate(self.tap_weights()):
            lin = state.get(f"lin{k}.model.1.weight")
            if lin is not None:
                weights.copy_(lin.flatten())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _LPIPS_TAPS:
                taps.append(x)
            if i == _LPIPS_TAPS[-1]:
                break
        return taps

    def tap_weights(self) -> list[torch.Tensor]:
        """LPIPS's learned per-channel weights of each tap ("lin" layers); all ones when the file has none."""
        return [getattr(self, f"tap_weight_{k}") for k in range(len(_LPIPS_TAPS))]


def vae_features(vae: AutoencoderKL, images: torch.Tensor) -> list[torch.Tensor]:
    """The frozen VAE encoder's multi-scale features: the output of each down block and of the mid block."""
    encoder = vae.encoder
    x = encoder.conv_in(images)
    taps = []
    for block in encoder.down_blocks:
        x = block(x)
        taps.append(x)
    taps.append(encoder.mid_block(x))
    return taps


def perceptual_loss(
    features: Callable[[torch.Tensor], list[torch.Tensor]],
    prediction: torch.Tensor,
    target: torch.Tensor,
    tap_weights: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """LPIPS-style distance per sample over the feature maps `features` returns (optionally channel-weighted)."""
    ours = features(prediction)
    with torch.no_grad():
        theirs = features(target)
    weights: Sequence[torch.Tensor | None] = tap_weights if tap_weights is not None else [None] * len(ours)
    total = prediction.new_zeros(prediction.shape[0])
    for a, b, w in zip(ours, theirs, weights, strict=True):
        diff = (_unit(a) - _unit(b)).pow(2)
        if w is not None:
            diff = diff * w.view(1, -1, 1, 1)
        total = total + diff.sum(dim=1).mean(dim=(1, 2))
    return total


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def mae_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel error per sample."""
    return (prediction - target).abs().flatten(1).mean(dim=1)


def ssim_loss(prediction: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """1 - SSIM per sample (gaussian window, images mapped to [0, 1], valid convolution, mean over channels)."""
    x, y = (prediction + 1) / 2, (target + 1) / 2
    window = min(window, x.shape[-1], x.shape[-2])
    window -= 1 - window % 2  # an odd window, so it has a centre
    coords = torch.arange(window, dtype=x.dtype, device=x.device) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=x.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return 1 - ssim.flatten(1).mean(dim=1)


def eps_mse_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The plain diffusion loss: mean squared error of the predicted noise, per sample."""
    return (prediction - target).pow(2).flatten(1).mean(dim=1)
