"""Pictures a person would rather look at than read: loss curves and reconstruction grids."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dsvlm.errors import DsvlmError

log = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (a kill or a full disk mid-write) is dropped with a
    warning; a bad line before it is an error."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number < len(lines):
                raise DsvlmError(f"{path} line {number} is not JSON ({exc.msg}); the metrics file is corrupt") from exc
            log.warning("%s: dropping its torn last line %d (an interrupted write)", path, number)
    return records


def plot_losses(metrics: list[dict], out: Path, title: str) -> Path:
    """Text, reconstruction and total loss against the optimizer step, written atomically as PNG."""
    steps = [m["step"] for m in metrics]
    curves = {}
    for key, label in (("text_loss", "text"), ("rec_loss", "reconstruction"), ("loss", "total")):
        values = [m.get(key) for m in metrics]
        if any(v for v in values):
            curves[label] = (steps, [np.nan if v is None else v for v in values])
    return plot_curves(curves, out, title, "optimizer step")


def plot_curves(
    curves: dict[str, tuple[list, list]], out: Path, title: str, xlabel: str, log_scale: bool = False
) -> Path:
    """Named (x, y) loss curves in one figure, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, linewidth=1.2)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


def image_grid(rows: list[torch.Tensor], out: Path, scale: int = 4) -> Path:
    """Save rows of images (each (n,3,H,W) in [0,1]) as one PNG grid; nearest upscaling keeps tiny images legible."""
    tiles = [torch.cat(list(row.clamp(0, 1).float().cpu()), dim=2) for row in rows]  # each (3, H, n*W)
    grid = torch.cat(tiles, dim=1)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    image.save(tmp)
    tmp.replace(out)
    return out
