"""`dsvlm eval MODEL [--bench NAME[,NAME...]] [--recipe NAME|FILE]`: score a stripped model through lmms-eval.

The options left out come from a recipe's `eval:` section: `--recipe`'s, else the training run's own when MODEL
is a run (RUN/recipe.yaml), a stage directory or a stage output.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from dsvlm.cli.common import console, emit
from dsvlm.evaluation.benches import BENCHMARKS, parse_benches, parse_data_files
from dsvlm.recipe import Recipe

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add the `eval` command to the root app."""
    app.command("eval")(eval_command)


def eval_command(
    model: Path = typer.Argument(
        ..., help="Stripped model directory (the output of `dsvlm strip`), or a training run (stripped on the fly)."
    ),
    bench: list[str] | None = typer.Option(
        None,
        "--bench",
        "-b",
        help=f"Benchmarks, comma-separated or repeated: {', '.join(BENCHMARKS)} "
        "(default: the recipe's eval.benchmarks).",
    ),
    recipe: str | None = typer.Option(
        None,
        "--recipe",
        help="Bundled recipe name or YAML path whose `eval:` section gives the defaults of the "
        "other options (default: the training run's own recipe when MODEL is a run).",
    ),
    data_files: list[str] = typer.Option(
        [],
        "--data-files",
        help="BENCH=PATH (repeatable): a local parquet copy of a benchmark, or a prepared dataset folder "
        "(`synthetic` needs one; a recipe gives its data.dataset). Added to the recipe's eval.data_files.",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Output folder (default: results/<model>/<benchmarks>, outside the model directory)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Generation batch size (default: the recipe's eval.batch_size, 8)."
    ),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Only the first N items of each benchmark (default: eval.limit, all)."
    ),
    max_new_tokens: int | None = typer.Option(
        None,
        "--max-new-tokens",
        min=1,
        help="Cap every task's generation length (default: eval.max_new_tokens, else each task's own).",
    ),
    device: str = typer.Option("auto", "--device", help="Torch device: auto (a GPU when present), cpu, cuda..."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary JSON instead of its path."),
    compare_to: Path | None = typer.Option(
        None, "--compare", help="Another summary.json (or its folder): print per-benchmark and per-category deltas."
    ),
) -> None:
    """Run benchmarks through lmms-eval; print the summary path (or, with --json, the summary)."""
    from dsvlm.evaluation.runner import SUMMARY, compare, compare_table, default_out_dir, evaluate, load_summary
    from dsvlm.evaluation.settings import eval_settings
    from dsvlm.strip.strip import stripped_model

    settings = eval_settings(
        _defaults_recipe(model, recipe),
        benchmarks=parse_benches(bench) if bench else None,
        data_files=parse_data_files(data_files),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        limit=limit,
    )
    base = load_summary(compare_to) if compare_to is not None else None  # a bad file fails before the run
    out_dir = out if out is not None else default_out_dir(model, settings.benchmarks)
    summary = evaluate(
        stripped_model(model),
        settings.benchmarks,
        out_dir,
        data_files=settings.data_files,
        batch_size=settings.batch_size,
        limit=settings.limit,
        max_new_tokens=settings.max_new_tokens,
        device=device,
        dtype=dtype,
    )
    if base is not None:
        deltas = compare(base, summary)
        console.print(compare_table(deltas))
        summary = {**summary, "compare": deltas}
    if as_json:
        emit(json.dumps(summary, indent=2))
    else:
        emit(str(Path(out_dir).expanduser().resolve() / SUMMARY))


def _defaults_recipe(model: Path, recipe: str | None) -> Recipe | None:
    """The recipe whose `eval:` section fills the options left out: `--recipe`, else the one a training run
    saved, else none."""
    from dsvlm.recipe.load import load_recipe, read_yaml, validate_recipe

    if recipe is not None:
        return load_recipe(recipe)
    saved = _saved_recipe(Path(model).expanduser())
    if saved is None:
        return None
    log.info("eval defaults from the run's recipe %s", saved)
    return validate_recipe(read_yaml(saved), source=str(saved))


def _saved_recipe(model: Path) -> Path | None:
    """The recipe.yaml of a training run (its marker), a stage output or stage directory (stage.json), or of the
    stage that an on-the-fly strip (RUN/STAGE/stripped) came from; a folder dsvlm did not write has none."""
    from dsvlm.outputs import RUN
    from dsvlm.rundir import FINAL, STAGE_INFO, STRIPPED

    signs = [(model / RUN.marker, model), (model / STAGE_INFO, model), (model / FINAL / STAGE_INFO, model / FINAL)]
    if model.name == STRIPPED:
        signs.append((model.parent / FINAL / STAGE_INFO, model.parent / FINAL))
    for sign, folder in signs:
        if sign.is_file() and (folder / "recipe.yaml").is_file():
            return folder / "recipe.yaml"
    return None
