"""`dsvlm pretrain-diffusion DATASET --out DIR`: the toy stand-in for Stable Diffusion."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dsvlm.cli.common import emit


def pretrain_diffusion(
    dataset: Path = typer.Argument(..., help="Prepared dataset (the output of `dsvlm prepare`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the diffusers model (unet/, scheduler/, ...)."),
    steps: int = typer.Option(1000, help="UNet + text encoder optimizer steps."),
    vae_steps: int = typer.Option(0, help="AutoencoderKL steps before the UNet; 0 = diffuse in pixel space."),
    batch_size: int = typer.Option(32, help="Images per step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (warmup, then cosine)."),
    resolution: int = typer.Option(32, help="Image side in pixels (the supervision branch's resolution)."),
    width: int = typer.Option(16, help="Channels of the UNet's first level (the next two have 2x and 4x)."),
    prediction_type: str = typer.Option("sample", help="UNet target: sample (x0), epsilon or v_prediction."),
    seed: int = typer.Option(0, help="Seed of weights, batches, noise and the held-out captions."),
    split: str = typer.Option("align", help="Split of captioned images to train on."),
    checkpoint_every: int = typer.Option(200, help="Steps between checkpoints (for --resume)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a diffusion model dsvlm wrote in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print pretrain.json on stdout instead of the path."),
) -> None:
    """Pretrain a small caption-conditioned diffusion model in Stable Diffusion's layout (prints its path).

    Reuses a finished model in --out trained with the same options. Point a recipe at it with
    `supervision.diffusion.pretrained=DIR`.
    """
    from dsvlm.diffusion.pretrain import INFO, PretrainOptions
    from dsvlm.diffusion.pretrain import pretrain_diffusion as run

    options = PretrainOptions(
        steps=steps,
        vae_steps=vae_steps,
        batch_size=batch_size,
        lr=lr,
        resolution=resolution,
        width=width,
        prediction_type=prediction_type,
        seed=seed,
        split=split,
        checkpoint_every=checkpoint_every,
    )
    path = run(dataset, out, options, resume=resume, overwrite=overwrite, progress=progress)
    emit(json.dumps(json.loads((path / INFO).read_text())) if as_json else str(path))


def register(app: typer.Typer) -> None:
    app.command("pretrain-diffusion")(pretrain_diffusion)
