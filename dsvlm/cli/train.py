"""`dsvlm train RECIPE [key=value ...]`."""

from __future__ import annotations

from pathlib import Path

import typer

from dsvlm.cli.common import emit
from dsvlm.cli.recipe import OVERRIDES_HELP


def train(
    recipe: str = typer.Argument(..., help="Bundled recipe name or YAML path."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    stage: list[str] = typer.Option(None, "--stage", help="Run only this stage (repeatable). Default: all, in order."),
    init: Path = typer.Option(None, "--init", help="Start from a run directory or a stage output (RUN/STAGE/final)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest valid checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace earlier stages in run.output_dir."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar on stderr."),
) -> None:
    """Train the recipe's stages (alignment, then instruction tuning) with diffusion supervision.

    Prints the final stage output directory on stdout (what `dsvlm strip` and `--init` take).
    Multi-GPU: `accelerate launch [--config_file ...] -m dsvlm train RECIPE ...`.
    """
    from dsvlm.recipe import load_recipe
    from dsvlm.recipe.load import warn_remote_code
    from dsvlm.train.loop import TrainOptions
    from dsvlm.train.loop import train as run_training

    parsed = load_recipe(recipe, overrides or [])
    warn_remote_code(parsed)
    out = run_training(
        parsed, TrainOptions(stages=stage or None, init=init, resume=resume, overwrite=overwrite, progress=progress)
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        emit(str(out))


def register(app: typer.Typer) -> None:
    app.command("train")(train)
