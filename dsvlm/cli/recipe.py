"""`dsvlm recipe ls|show|cp|validate|schema`: the bundled recipes and the schema."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from dsvlm.cli.common import console, emit, results_stream
from dsvlm.errors import RecipeError
from dsvlm.io import atomic_write_text
from dsvlm.recipe import bundled_recipes, load_recipe, recipe_path
from dsvlm.recipe.load import warn_remote_code
from dsvlm.recipe.schema import Recipe

app = typer.Typer(help="List, show, copy and validate recipes; export the schema.", no_args_is_help=True)

OVERRIDES_HELP = "Overrides `key.sub=value` (YAML values), e.g. stages.0.lr=1e-4 supervision.enabled=false."


@app.command("list")
def list_recipes() -> None:
    """List the bundled recipes: a table with descriptions in a terminal, one name per line when piped."""
    recipes = bundled_recipes()
    if not results_stream().isatty():  # a pipeline consumes the names; a person reads the table, once
        for name in recipes:
            emit(name)
        return
    table = Table("recipe", "description", title="bundled recipes")
    for name, description in recipes.items():
        table.add_row(name, description)
    Console(file=results_stream()).print(table)


app.command("ls", hidden=True)(list_recipes)


@app.command()
def show(
    recipe: str = typer.Argument(..., help="Bundled name or path."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    resolved: bool = typer.Option(False, help="Print the validated recipe with every default filled in."),
) -> None:
    """Print a recipe (the file as written, or --resolved with overrides and defaults applied)."""
    if resolved or overrides:
        from dsvlm.recipe.load import dump_recipe

        emit(dump_recipe(load_recipe(recipe, overrides or [])), nl=False)
    else:
        emit(recipe_path(recipe).read_text(), nl=False)


@app.command()
def cp(
    recipe: str = typer.Argument(..., help="Bundled name."),
    dest: Path = typer.Argument(..., help="File to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
    force: bool = typer.Option(False, "--force", hidden=True, help="Deprecated spelling of --overwrite."),
) -> None:
    """Copy a bundled recipe to a file you can edit."""
    if force:
        console.print("[yellow]warning:[/] --force is deprecated, use --overwrite")
    source = recipe_path(recipe)
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not (overwrite or force):
        raise RecipeError(f"{dest} exists; pass --overwrite to replace it")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dest, source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    emit(str(dest))


@app.command()
def validate(
    recipe: str = typer.Argument(..., help="Bundled name or path."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Validate a recipe (and overrides) without running anything."""
    parsed = load_recipe(recipe, overrides or [])
    warn_remote_code(parsed)
    stages = ", ".join(s.name for s in parsed.stages)
    console.print(
        f"[green]ok[/] {recipe}: stages {stages}; supervision {'on' if parsed.supervision.enabled else 'off'}"
    )


@app.command()
def schema() -> None:
    """Print the recipe JSON schema (with every field's description) to stdout."""
    emit(json.dumps(Recipe.model_json_schema(), indent=2))
