"""`dsvlm ablate RECIPE [key=value ...]`: arms x seeds, each cell train -> strip -> eval (-> probe), a report."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dsvlm.cli.common import emit
from dsvlm.cli.recipe import OVERRIDES_HELP


def ablate(
    recipe: str = typer.Argument(..., help="Bundled recipe name or YAML path (its `ablate:` section gives arms)."),
    overrides: list[str] = typer.Argument(None, help=f"Applied to every arm. {OVERRIDES_HELP}"),
    arm: list[str] = typer.Option(
        None,
        "--arm",
        help="NAME=key=value,key=value (repeatable): one arm and its overrides; `NAME` alone or "
        "`NAME=` is an arm of the recipe as it is.",
    ),
    seeds: str | None = typer.Option(
        None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2 (default: the recipe's ablate.seeds)."
    ),
    baseline: str | None = typer.Option(
        None, "--baseline", help="The arm the others are compared with (default: ablate.baseline, else the first arm)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Grid directory (default: ablate.output_dir)."),
    cell: str | None = typer.Option(
        None,
        "--cell",
        help="Run this one cell, ARM:SEED, and no report (for shell "
        "loops, CI matrices, cluster fan-out). Prints the cell directory.",
    ),
    report_only: bool = typer.Option(False, "--report-only", help="Only build the report from finished cells."),
    probe: bool | None = typer.Option(None, "--probe/--no-probe", help="Probe each cell (default: ablate.probe)."),
    device: str | None = typer.Option(None, "--device", help="Eval/probe device (default: cuda if available)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show training progress bars on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print the report JSON instead of its path."),
) -> None:
    """Run a controlled comparison: every arm x seed cell (finished cells are skipped, a killed one resumes),
    then OUT/report.{md,json,png} with mean ± std per arm and paired deltas with bootstrap intervals."""
    from dsvlm.ablate.grid import build_grid, parse_arm, parse_cell, parse_seeds, run_cell, run_grid
    from dsvlm.ablate.report import REPORT_JSON, build_report
    from dsvlm.errors import DsvlmError

    if cell is not None and report_only:
        raise DsvlmError("--cell and --report-only exclude each other")
    grid = build_grid(
        recipe,
        overrides or [],
        [parse_arm(a) for a in arm or []],
        parse_seeds(seeds) if seeds is not None else None,
        baseline,
        out,
        probe,
    )
    if cell is not None:
        name, seed = parse_cell(cell)
        grid.arm(name)
        emit(str(run_cell(grid, name, seed, device=device, progress=progress)))
        return
    report = build_report(grid) if report_only else run_grid(grid, device=device, progress=progress)
    emit(json.dumps(report, indent=2) if as_json else str(grid.out / REPORT_JSON))


def register(app: typer.Typer) -> None:
    app.command("ablate")(ablate)
