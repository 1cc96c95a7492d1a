"""The run directory: resolved recipe, environment, one sub-directory per stage.

OUT/recipe.yaml   OUT/env.json
OUT/<stage>/metrics.jsonl  checkpoints/step-000100/  final/  loss.png  reconstructions.png  previews/
OUT/<stage>/stripped/      (made on the fly when `dsvlm eval` or `dsvlm probe` is given the run)
OUT/tensorboard/<stage>/   (with run.tensorboard)
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

from dsvlm.errors import DsvlmError
from dsvlm.io import atomic_write_json, atomic_write_text
from dsvlm.outputs import RUN, check_output, remove_dead_temporaries, write_marker
from dsvlm.recipe.load import dump_recipe, read_yaml
from dsvlm.recipe.schema import Recipe

log = logging.getLogger(__name__)

FINAL = "final"
STRIPPED = "stripped"  # the stage output stripped on the fly, next to final/
STAGE_INFO = "stage.json"
TENSORBOARD = "tensorboard"


def environment(world_size: int, device: str) -> dict[str, Any]:
    """What a reader needs to reproduce or compare a run."""
    libs = ("dsvlm", "torch", "transformers", "diffusers", "accelerate", "lmms-eval")
    versions = {}
    for lib in libs:
        try:
            versions[lib] = version(lib)
        except Exception:  # a missing optional package is recorded, not fatal
            versions[lib] = None
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "world_size": world_size,
        "device": device,
        "versions": versions,
    }


def _comparable(recipe_dict: dict[str, Any]) -> dict[str, Any]:
    """The parts of a recipe that must match for two invocations to belong to the same run."""
    return {k: v for k, v in recipe_dict.items() if k not in ("run", "eval", "description", "ablate")}


@dataclass
class RunDir:
    root: Path

    @classmethod
    def open(cls, root: Path, recipe: Recipe, stages: list[str], resume: bool, overwrite: bool) -> RunDir:
        """Create or reopen a run directory, refusing to clobber another run's stages. In a distributed run only
        the main process calls this (see `train.loop`): another one checking meanwhile would see a half-made run."""
        root = Path(root)
        if overwrite:  # it deletes stages: only ever inside a dsvlm run (or an empty folder)
            check_output(root, RUN, overwrite)
        elif root.is_dir() and any(root.iterdir()) and not (root / RUN.marker).is_file():
            # A run writes recipe.yaml, env.json and stage folders here: never into a folder of the user's
            what = "continue a run in it" if resume else "start a run in it"
            raise DsvlmError(
                f"{root} is not empty and is not a dsvlm run (no {RUN.marker}); refusing to {what}: "
                "choose another run.output_dir"
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-probe-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise DsvlmError(f"cannot write to the output directory {root}: {exc.strerror or exc}") from exc
        run = cls(root)
        stored = root / "recipe.yaml"
        if stored.exists() and not overwrite:
            previous = read_yaml(stored)
            if _comparable(previous) != _comparable(recipe.model_dump(mode="json")):
                raise DsvlmError(
                    f"{root} holds a run of a different recipe ({stored}); choose another run.output_dir, "
                    "or pass --overwrite to replace it"
                )
        for stage in stages:
            stage_dir = run.stage_dir(stage)
            if stage_dir.exists() and any(stage_dir.iterdir()):
                if overwrite:
                    shutil.rmtree(stage_dir)
                    shutil.rmtree(root / TENSORBOARD / stage, ignore_errors=True)  # the replaced stage's curves
                elif not resume:
                    raise DsvlmError(
                        f"{stage_dir} already holds stage {stage!r} of a run; pass --resume to continue it "
                        "or --overwrite to replace it"
                    )
        # Under the run's writer lock (train): what other processes left is theirs no more
        remove_dead_temporaries(root.rglob(".*"))
        for stage in stages:
            remove_checkpoint_temporaries(run.checkpoints_dir(stage))
        write_marker(root, RUN)
        atomic_write_text(stored, dump_recipe(recipe))
        return run

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def final_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / FINAL

    def checkpoints_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "checkpoints"

    def metrics_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "metrics.jsonl"

    def write_environment(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.root / "env.json", info)


def is_final(path: Path) -> bool:
    """A stage output is complete once its stage.json exists (written last)."""
    return (path / STAGE_INFO).is_file()


def resolve_init(path: Path) -> Path:
    """Accept a stage output (`.../final`), a stage directory, or a run directory (its last finished stage)."""
    path = Path(path)
    if is_final(path):
        return path
    if is_final(path / FINAL):
        return path / FINAL
    finished = [d / FINAL for d in sorted(path.iterdir()) if is_final(d / FINAL)] if path.is_dir() else []
    if finished:
        return max(finished, key=lambda p: json.loads((p / STAGE_INFO).read_text()).get("finished", ""))
    raise DsvlmError(
        f"{path} is not a finished stage output or run directory (no {FINAL}/{STAGE_INFO}); "
        "pass a run directory, or RUN/<stage>/final"
    )


def remove_checkpoint_temporaries(directory: Path) -> None:
    """Remove the `.step-N.tmp` directories (`train.checkpoint` writes into one) that a killed run left. Call it
    only while holding the run's writer lock: then no live process is writing one."""
    for tmp in directory.glob(".step-*.tmp"):
        log.info("removing %s, left by an interrupted checkpoint write", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
