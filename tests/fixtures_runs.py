"""The tiny trained run shared by the tests that need a finished stage (strip, eval of a run, `--init`, a run to
refuse or replace): the session fixture `tiny_run` (conftest.py) trains it once per test process.

Tests that only read the run use it as it is; tests that write into it (`eval` strips into it, `--overwrite`
replaces it) take `run.copy(...)`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from helpers import prepare_small_synthetic, tiny_overrides

STEPS = 2  # per stage; the tests need a finished stage's format, not a good model


@dataclass(frozen=True)
class TinyRun:
    data: Path  # the prepared synthetic set it trained on (32 records)
    root: Path  # run.output_dir: stage `align` finished

    def overrides(self, **extra: object) -> list[str]:
        """The overrides that trained this run (the same recipe: `dsvlm train` with them continues this run)."""
        return tiny_overrides(self.data, self.root, steps=STEPS, **extra)

    @property
    def final(self) -> Path:
        return self.root / "align" / "final"

    def copy(self, dest: Path) -> TinyRun:
        """A private copy to write into; the shared run stays as trained."""
        shutil.copytree(self.root, dest, symlinks=True)
        return TinyRun(self.data, dest)


def train_tiny_run(root: Path) -> TinyRun:
    """`dsvlm train tiny-synthetic --stage align` for two steps, in process, under `root`."""
    from dsvlm.recipe import load_recipe
    from dsvlm.train.loop import TrainOptions, train

    run = TinyRun(prepare_small_synthetic(root / "data", n=32), root / "run")
    train(load_recipe("tiny-synthetic", run.overrides()), TrainOptions(stages=["align"], progress=False))
    return run
