"""`dsvlm ablate`: a grid of named arms (recipe overrides) x seeds; each cell a full train -> strip -> eval
(-> probe) through the library functions the single commands use.

    OUT/cells/ARM/seed-S/run/      the training run (run.seed = S, run.output_dir = this folder)
                         model/    the stripped LLaVA
                         eval/     summary.json and lmms-eval's samples files
                         probe/    probe.json/.md/.png
                         done.json written last: a cell with it is finished and skipped
    OUT/report.{md,json,png}

A cell without done.json is resumed: training continues from its last checkpoint (finished stages are kept),
and a strip, eval or probe whose output is complete is not redone.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dsvlm.errors import DsvlmError, RecipeError, RunFailure
from dsvlm.io import atomic_write_json
from dsvlm.recipe.load import apply_override, read_yaml, recipe_path, validate_recipe
from dsvlm.recipe.schema import AblateConfig, Recipe

log = logging.getLogger(__name__)

DONE = "done.json"
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a directory name, and no ':' (ARM:SEED)
# Overrides of one --arm are comma-separated, but a value may hold commas ([connector,vision]): split only
# before something that looks like the next `key=`.
NEXT_OVERRIDE = re.compile(r",(?=[A-Za-z_][\w.]*=)")


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Grid:
    """A validated grid: every arm's recipe loads, the seeds and the baseline are sound."""

    recipe: str  # bundled name or path
    overrides: tuple[str, ...]  # applied to every arm, before the arm's own
    arms: tuple[Arm, ...]
    baseline: str
    seeds: tuple[int, ...]
    benchmarks: tuple[str, ...]
    out: Path
    config: AblateConfig
    eval_settings: dict[str, Any] = field(default_factory=dict)  # evaluate() keyword arguments shared by cells

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise DsvlmError(f"no arm {name!r} in the grid (arms: {', '.join(a.name for a in self.arms)})")

    def cell_dir(self, arm: str, seed: int) -> Path:
        return self.out / "cells" / arm / f"seed-{seed}"

    def cells(self) -> list[tuple[str, int]]:
        return [(arm.name, seed) for arm in self.arms for seed in self.seeds]


def parse_arm(text: str) -> Arm:
    """`NAME=key=value,key=value` (or just `NAME`, an arm without overrides) -> Arm."""
    name, _, rest = text.partition("=")
    name = name.strip()
    overrides = tuple(o.strip() for o in NEXT_OVERRIDE.split(rest) if o.strip()) if rest.strip() else ()
    check_arm_name(name)
    return Arm(name, overrides)


def check_arm_name(name: str) -> None:
    if not ARM_NAME.match(name):
        raise DsvlmError(f"arm name {name!r} must be letters, digits and _ . + - (it names a directory)")


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` -> [0, 1, 2]."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise DsvlmError(f"--seeds expects comma-separated integers, got {text!r}") from None


def parse_cell(text: str) -> tuple[str, int]:
    """`ARM:SEED` -> (arm, seed)."""
    arm, sep, seed = text.rpartition(":")
    if not sep or not arm or not seed.strip().lstrip("-").isdigit():
        raise DsvlmError(f"--cell expects ARM:SEED, e.g. baseline:0, got {text!r}")
    return arm, int(seed)


def build_grid(
    recipe: str,
    overrides: list[str] | tuple[str, ...] = (),
    arms: list[Arm] | tuple[Arm, ...] = (),
    seeds: list[int] | None = None,
    baseline: str | None = None,
    out: str | Path | None = None,
    probe: bool | None = None,
) -> Grid:
    """The grid of `recipe`'s `ablate:` section plus the command line's arms; seeds, baseline, output and
    probe from the command line win over the recipe's. Every arm's recipe is validated here, before any run."""
    from dsvlm.evaluation.settings import eval_settings
    from dsvlm.recipe import load_recipe

    base = load_recipe(recipe, overrides)
    config = base.ablate or AblateConfig()
    all_arms = [Arm(name, tuple(values)) for name, values in config.arms.items()] + list(arms)
    if not all_arms:
        raise DsvlmError("no arms: give --arm NAME=key=value,... (repeatable) or an `ablate: arms:` section")
    names = [arm.name for arm in all_arms]
    for name in names:
        check_arm_name(name)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DsvlmError(f"arm name used twice: {', '.join(twice)} (arms of the recipe and of --arm share names)")
    seed_list = list(config.seeds if seeds is None else seeds)
    if not seed_list:
        raise DsvlmError("the seed list is empty: give --seeds 0,1,2 or `ablate: seeds: [...]`")
    if len(set(seed_list)) != len(seed_list):
        raise DsvlmError(f"a seed is listed twice: {seed_list}")
    baseline = baseline or config.baseline or names[0]
    if baseline not in names:
        raise DsvlmError(f"baseline {baseline!r} is not an arm (arms: {', '.join(names)})")
    settings = eval_settings(base, benchmarks=config.benchmarks)
    grid = Grid(
        recipe=recipe,
        overrides=tuple(overrides),
        arms=tuple(all_arms),
        baseline=baseline,
        seeds=tuple(seed_list),
        benchmarks=tuple(settings.benchmarks),
        out=Path(out or config.output_dir).expanduser().resolve(),
        config=config if probe is None else config.model_copy(update={"probe": probe}),
        eval_settings={
            "data_files": settings.data_files,
            "batch_size": settings.batch_size,
            "max_new_tokens": settings.max_new_tokens,
            "limit": settings.limit,
        },
    )
    for arm in grid.arms:
        cell_recipe(grid, arm.name, grid.seeds[0])  # a bad override fails now, naming its arm
    return grid


def cell_recipe(grid: Grid, arm: str, seed: int) -> Recipe:
    """The recipe of one cell: the file, the common overrides, the arm's, then run.seed and run.output_dir."""
    overrides = grid.arm(arm).overrides
    data = read_yaml(recipe_path(grid.recipe))
    try:
        for override in (*grid.overrides, *overrides):
            apply_override(data, override)
        data.pop("ablate", None)  # the grid's arms are no part of a cell's run (editing them must not fork it)
        apply_override(data, f"run.seed={seed}")
        apply_override(data, f"run.output_dir={grid.cell_dir(arm, seed) / 'run'}")
        return validate_recipe(data, source=f"{grid.recipe} + arm {arm!r} ({' '.join(overrides) or 'no overrides'})")
    except RecipeError as exc:
        message = str(exc)
        raise RecipeError(message if f"arm {arm!r}" in message else f"arm {arm!r}: {message}") from exc


def is_done(grid: Grid, arm: str, seed: int) -> bool:
    return (grid.cell_dir(arm, seed) / DONE).is_file()


def run_cell(grid: Grid, arm: str, seed: int, device: str | None = None, progress: bool = False) -> Path:
    """Train, strip, evaluate (and probe) one cell; a finished cell is skipped. Returns the cell directory."""
    from dsvlm.analysis.probe import PROBE_JSON, ProbeConfig, probe_model
    from dsvlm.evaluation.runner import SUMMARY, evaluate
    from dsvlm.strip.strip import strip
    from dsvlm.train.loop import TrainOptions, train

    if seed not in grid.seeds:
        raise DsvlmError(f"seed {seed} is not in the grid's seeds ({', '.join(map(str, grid.seeds))})")
    cell = grid.cell_dir(arm, seed)
    if is_done(grid, arm, seed):
        log.info("cell %s:%d already done, skipped (%s)", arm, seed, cell)
        return cell
    log.info("cell %s:%d -> %s", arm, seed, cell)
    started = time.perf_counter()
    recipe = cell_recipe(grid, arm, seed)
    # Always resume: a fresh run starts at step 0, a killed one from its checkpoint, finished stages are kept.
    try:
        final = train(recipe, TrainOptions(resume=True, progress=progress))
    except DsvlmError as exc:  # naming the cell; a failure stays a failure (exit 1)
        kind = RunFailure if isinstance(exc, RunFailure) else DsvlmError
        raise kind(f"cell {arm}:{seed}: {exc}") from exc
    model = cell / "model"
    if not (model / "config.json").is_file():  # written atomically: present means complete
        strip(final, model, overwrite=True)
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not (cell / "eval" / SUMMARY).is_file():
        evaluate(model, list(grid.benchmarks), cell / "eval", device=device, **grid.eval_settings)
    if grid.config.probe and not (cell / "probe" / PROBE_JSON).is_file():
        settings = ProbeConfig(
            n_train=grid.config.probe_train, n_test=grid.config.probe_test, steps=grid.config.probe_steps
        )
        probe_model(model, cell / "probe", settings, device=device)
    atomic_write_json(
        cell / DONE,
        {
            "arm": arm,
            "seed": seed,
            "overrides": list(grid.overrides) + list(grid.arm(arm).overrides),
            "seconds": round(time.perf_counter() - started, 1),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return cell


def run_grid(grid: Grid, device: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Every cell (finished ones skipped), then the report. Returns the report summary."""
    from dsvlm.ablate.report import build_report

    started = time.perf_counter()
    for arm, seed in grid.cells():
        run_cell(grid, arm, seed, device=device, progress=progress)
    log.info("grid of %d cells finished in %.0f s", len(grid.cells()), time.perf_counter() - started)
    return build_report(grid)
