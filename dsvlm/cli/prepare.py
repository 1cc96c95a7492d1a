"""`dsvlm prepare synthetic|llava|hub|latents`: validated, prepared datasets.

stdout carries only the dataset path (or, with --json, a JSON summary); the summary table and progress go to
stderr.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from dsvlm.cli.common import console, emit
from dsvlm.errors import DataError

if TYPE_CHECKING:
    from dsvlm.data.latents import LatentRequest
    from dsvlm.recipe import Recipe

app = typer.Typer(
    help="Prepare datasets: LLaVA-format JSON, a hub dataset, or the built-in synthetic set.", no_args_is_help=True
)

# Arguments and options several commands share (typer copies them per command).
OUT = typer.Argument(..., help="Output dataset directory.")
RECIPE_OVERRIDES = typer.Argument(
    None, help="Recipe overrides `key.sub=value` for --latents, e.g. supervision.resolution=64.", show_default=False
)
STRICT = typer.Option(False, "--strict", help="Stop at the first bad record (exit 2) instead of skipping.")
ALLOW_EMPTY = typer.Option(
    False, "--allow-empty", help="Write the dataset even when an input keeps no record (empty, or all skipped)."
)
WORKERS = typer.Option(1, "--workers", min=1, help="Processes that check images in parallel.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing OUT (kept until the new dataset is complete).")
LATENTS = typer.Option(
    None,
    "--latents",
    metavar="RECIPE",
    help="Also cache VAE latents for this recipe (bundled name or file): every image encoded once by the "
    "recipe's VAE at supervision.resolution. Skipped for pixel-space recipes.",
)
AS_JSON = typer.Option(False, "--json", help="Print a JSON summary on stdout instead of the path.")


class OptionOrder(str, Enum):
    canonical = "canonical"
    shuffled = "shuffled"


def _load_vae(recipe: Recipe) -> Any:
    from dsvlm.model.supervision.components import load_vae

    return load_vae(recipe.supervision.diffusion, recipe.run.seed)


def _latent_request(recipe_name: str | None, overrides: list[str] | None) -> LatentRequest | None:
    """Load the recipe and its VAE up front, so a bad recipe fails before minutes of preparation."""
    if recipe_name is None:
        if overrides:
            raise DataError(f"recipe overrides {' '.join(overrides)} given without --latents RECIPE")
        return None
    from dsvlm.data.latents import LatentRequest
    from dsvlm.model.supervision.vae import vae_fingerprint
    from dsvlm.recipe import load_recipe

    recipe = load_recipe(recipe_name, overrides or [])
    if not recipe.supervision.enabled:
        console.print(f"recipe {recipe_name} has supervision disabled: no latent cache needed, skipping --latents")
        return None
    vae = _load_vae(recipe)
    if vae is None:
        console.print(
            f"recipe {recipe_name} diffuses in pixel space (no VAE): no latent cache needed, skipping --latents"
        )
        return None
    from dsvlm.model.vlm import image_geometry

    return LatentRequest(vae, recipe.supervision.resolution, vae_fingerprint(vae), image_geometry(recipe.model))


def _report(out: Path, manifest: dict[str, Any], as_json: bool) -> None:
    from dsvlm.data.common import SKIPPED
    from dsvlm.data.llava import summary_table

    console.print(summary_table(manifest, title=f"{out} ({manifest['kind']})"))
    skipped = sum(sum(split["skipped"].values()) for split in manifest["splits"].values())
    if skipped:
        console.print(f"{skipped} record(s) skipped; each is listed with its reason in {out / SKIPPED}")
    if "latents" in manifest:
        info = manifest["latents"]
        console.print(f"latent cache: {info['images']} images at {info['resolution']} px, shape {info['shape']}")
    if as_json:
        emit(json.dumps({"path": str(out), **manifest}, indent=2))
    else:
        emit(str(out))


@app.command()
def synthetic(
    out: Path = OUT,
    overrides: list[str] = RECIPE_OVERRIDES,
    n_align: int = typer.Option(2000, "--n-align", min=1, help="Caption records (stage 1)."),
    n_instruct: int = typer.Option(3000, "--n-instruct", min=1, help="Chat records (stage 2)."),
    n_eval: int = typer.Option(500, "--n-eval", min=1, help="Held-out MMBench-format eval items."),
    seed: int = typer.Option(0, help="Seed; the same seed gives the same files."),
    image_size: int = typer.Option(32, "--image-size", min=16, help="Image side in pixels."),
    question_types: str = typer.Option(
        "colour,shape,count,position,relative_position,relative_size,count_small",
        "--question-types",
        help="Comma-separated multiple-choice types of the instruct and eval sets (each an eval category): "
        "colour, shape, count, position, relative_position, relative_size, count_small (3-6 tiny shapes).",
    ),
    option_order: OptionOrder = typer.Option(
        OptionOrder.canonical,
        "--option-order",
        help="canonical: fixed option letters per question type (learnable in minutes); shuffled: random.",
    ),
    max_objects: int = typer.Option(2, "--max-objects", min=1, max=4, help="Shapes per image, at most."),
    workers: int = WORKERS,
    overwrite: bool = OVERWRITE,
    latents: str = LATENTS,
    as_json: bool = AS_JSON,
) -> None:
    """Generate the built-in synthetic set (coloured shapes, captions, chat, MMBench-format eval) and prepare it."""
    from dsvlm.data.synthetic import SyntheticConfig, prepare_synthetic

    config = SyntheticConfig(
        n_align=n_align,
        n_instruct=n_instruct,
        n_eval=n_eval,
        seed=seed,
        image_size=image_size,
        question_types=tuple(t.strip() for t in question_types.split(",") if t.strip()),
        option_order=option_order.value,
        max_objects=max_objects,
    )
    request = _latent_request(latents, overrides)
    manifest = prepare_synthetic(out, config, workers=workers, overwrite=overwrite, latents=request)
    _report(out, manifest, as_json)


@app.command()
def llava(
    out: Path = OUT,
    overrides: list[str] = RECIPE_OVERRIDES,
    align: Path = typer.Option(None, "--align", help="Stage-1 captions (JSON list or JSONL), e.g. LCS-558K."),
    instruct: Path = typer.Option(None, "--instruct", help="Stage-2 chat data (JSON list or JSONL), e.g. mix-665K."),
    image_root: Path = typer.Option(..., "--image-root", help="Directory the records' `image` paths are relative to."),
    strict: bool = STRICT,
    allow_empty: bool = ALLOW_EMPTY,
    workers: int = WORKERS,
    overwrite: bool = OVERWRITE,
    latents: str = LATENTS,
    as_json: bool = AS_JSON,
) -> None:
    """Validate and prepare LLaVA-format data; bad records are skipped and reported (or --strict stops)."""
    from dsvlm.data.llava import check_llava_inputs, prepare_llava

    splits = {name: path for name, path in (("align", align), ("instruct", instruct)) if path is not None}
    if not splits:
        raise DataError("give at least one of --align FILE and --instruct FILE")
    check_llava_inputs(out, splits, image_root)  # before --latents loads a VAE (from the hub, maybe)
    request = _latent_request(latents, overrides)
    manifest = prepare_llava(
        out,
        splits,
        image_root,
        strict=strict,
        allow_empty=allow_empty,
        workers=workers,
        overwrite=overwrite,
        latents=request,
    )
    _report(out, manifest, as_json)


@app.command()
def hub(
    repo: str = typer.Argument(..., help="Hub dataset repo, e.g. liuhaotian/LLaVA-Pretrain."),
    out: Path = OUT,
    overrides: list[str] = RECIPE_OVERRIDES,
    align: str = typer.Option(None, "--align", help="Captions file inside the repo (known repos: preset)."),
    instruct: str = typer.Option(None, "--instruct", help="Chat file inside the repo."),
    archive: str = typer.Option(None, "--archive", help="Zip of images inside the repo, extracted into OUT/images."),
    image_root: str = typer.Option(
        None, "--image-root", help="Image folder inside the repo, or a local absolute path."
    ),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit."),
    download_dir: Path = typer.Option(None, "--download-dir", help="Where the repo files go (default: OUT-hub)."),
    strict: bool = STRICT,
    allow_empty: bool = ALLOW_EMPTY,
    workers: int = WORKERS,
    overwrite: bool = OVERWRITE,
    latents: str = LATENTS,
    as_json: bool = AS_JSON,
) -> None:
    """Download a LLaVA-format dataset repo from the hub and prepare it (offline: says what to run instead)."""
    from dsvlm.data.hub import prepare_hub

    request = _latent_request(latents, overrides)
    manifest = prepare_hub(
        repo,
        out,
        align=align,
        instruct=instruct,
        archive=archive,
        image_root=image_root,
        revision=revision,
        download_dir=download_dir,
        strict=strict,
        allow_empty=allow_empty,
        workers=workers,
        overwrite=overwrite,
        latents=request,
    )
    _report(out, manifest, as_json)


@app.command("latents")
def latents_cmd(
    dataset: Path = typer.Argument(..., help="Prepared dataset directory."),
    recipe: str = typer.Argument(..., help="Recipe (bundled name or file) whose VAE and resolution to use."),
    overrides: list[str] = typer.Argument(None, help="Recipe overrides `key.sub=value`.", show_default=False),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per VAE forward pass."),
    as_json: bool = AS_JSON,
) -> None:
    """(Re)build the VAE latent cache of an existing prepared dataset for a recipe."""
    from dsvlm.data.prepared import PreparedDataset
    from dsvlm.outputs import writer_lock

    PreparedDataset(dataset)  # fail on a missing dataset before loading the VAE
    request = _latent_request(recipe, overrides)
    if request is None:
        emit(str(dataset))
        return
    request.batch_size = batch_size
    with writer_lock(dataset):
        manifest = request.build(dataset)
    _report(dataset, manifest, as_json)
