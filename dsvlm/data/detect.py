"""A simple detector for rendered synthetic scenes: the dominant object's colour and shape.

The synthetic set draws flat shapes in known colours on known backgrounds, so a nearest-colour mask and the
fill ratio of its bounding box tell colour and shape without any learned model. It scores generated
images (e.g. the samples of the pretrained tiny diffusion model) against the caption they were made from.
"""

from __future__ import annotations

import numpy as np

from dsvlm.data.synthetic import BACKGROUNDS, COLOURS

# Fill ratio of the bounding box: a square fills it (1.0), a disc about pi/4 (0.785), the triangle about 0.5.
SQUARE_MIN_FILL = 0.88
CIRCLE_MIN_FILL = 0.64
MIN_PIXELS = 4  # fewer object pixels than this: no object found


def _nearest(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour of each pixel (..., 3) and the distance to it."""
    colours = np.array(list(palette.values()), dtype=np.float32)
    distances = np.linalg.norm(pixels[..., None, :].astype(np.float32) - colours, axis=-1)
    return distances.argmin(-1), distances.min(-1)


def detect_object(image: np.ndarray) -> tuple[str | None, str | None]:
    """(colour, shape) of the largest object in an RGB uint8 image (H, W, 3); (None, None) if none is found."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = np.array(list(BACKGROUNDS.values()), dtype=np.float32)[
        np.bincount(_nearest(border, BACKGROUNDS)[0], minlength=len(BACKGROUNDS)).argmax()
    ]
    nearest, distance = _nearest(image, COLOURS)
    to_background = np.linalg.norm(image.astype(np.float32) - background, axis=-1)
    mask = distance < to_background
    if mask.sum() < MIN_PIXELS:
        return None, None
    index = int(np.bincount(nearest[mask], minlength=len(COLOURS)).argmax())
    ys, xs = np.nonzero(mask & (nearest == index))
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill >= SQUARE_MIN_FILL else "circle" if fill >= CIRCLE_MIN_FILL else "triangle"
    return list(COLOURS)[index], shape
