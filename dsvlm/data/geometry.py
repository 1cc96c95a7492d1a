"""The square an image becomes before anything sees it: LLaVA-1.5's pad-to-square or a centre crop.

Applied once per image, before both the encoder's processor and the diffusion branch's target (and the latent
cache), so the branch reconstructs exactly the region, at exactly the proportions, the encoder received.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from PIL import Image

AspectRatio = Literal["pad", "crop"]


@dataclass(frozen=True)
class SquareGeometry:
    """`pad`: centre the image on a square of `fill` (LLaVA-1.5's expand2square); `crop`: its centre square."""

    mode: AspectRatio
    fill: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def for_processor(cls, mode: AspectRatio, image_mean: Sequence[float]) -> SquareGeometry:
        """The geometry with LLaVA's pad colour: the image processor's mean, as 0-255 integers."""
        if mode not in ("pad", "crop"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'crop', got {mode!r}")
        fill = tuple(int(x * 255) for x in image_mean) if mode == "pad" else (0, 0, 0)
        return cls(mode, (fill[0], fill[1], fill[2]))

    @property
    def key(self) -> str:
        """What a latent cache records, so latents of another geometry are never mixed in."""
        return f"pad{list(self.fill)}" if self.mode == "pad" else "crop"

    def __call__(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        width, height = image.size
        if width == height:
            return image
        if self.mode == "pad":
            side = max(width, height)
            square = Image.new("RGB", (side, side), self.fill)
            square.paste(image, ((side - width) // 2, (side - height) // 2))
            return square
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return image.crop((left, top, left + side, top + side))
