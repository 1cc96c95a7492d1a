"""TensorBoard logging of the training metrics (`run.tensorboard`), through accelerate's trackers.

metrics.jsonl stays the record; TensorBoard gets the same numbers, every optimizer step, in
RUN/tensorboard/<stage>/ (`tensorboard --logdir RUN/tensorboard`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available

from dsvlm.errors import DsvlmError
from dsvlm.recipe.schema import Recipe
from dsvlm.rundir import TENSORBOARD


def check_tensorboard(recipe: Recipe) -> None:
    """Refuse `run.tensorboard` without the package, before any work: accelerate would drop the tracker with
    only a debug message, and the run would log nowhere."""
    if recipe.run.tensorboard and not is_tensorboard_available():
        raise DsvlmError(
            "run.tensorboard is on but the tensorboard package is not installed: "
            "pip install tensorboard (or dsvlm[tensorboard]), or set run.tensorboard=false"
        )


def tensorboard_dir(recipe: Recipe, run_root: Path) -> Path | None:
    """Where the stages' event files go, or None when TensorBoard is off."""
    return run_root / TENSORBOARD if recipe.run.tensorboard else None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record (not the stage name, the step, or an absent loss)."""
    return {
        key: value
        for key, value in record.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"
    }


def finish_trackers(accelerator: Accelerator) -> None:
    """Flush and close the stage's TensorBoard writer. Not `end_training`: that also destroys the process group,
    which the stage's end (gathering the weights) and the next stage still use."""
    for tracker in accelerator.trackers:
        tracker.finish()
