"""Resumable checkpoints: accelerate's state (model safetensors, optimizer, scheduler, RNG) + trainer state.

A checkpoint is written under a temporary name and renamed when complete, so `step-N/` either exists
whole or not at all; `trainer_state.json` is its last file.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from dsvlm.errors import DsvlmError
from dsvlm.io import atomic_write_json

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(accelerator: Accelerator, directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Save on every process (needed by FSDP/DeepSpeed), rename and prune on the main one."""
    final = directory / checkpoint_name(step)
    tmp = directory / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_json(tmp / STATE_FILE, {"step": step, **state})
            shutil.rmtree(final, ignore_errors=True)
            tmp.replace(final)
            prune(directory, keep)
    except Exception as exc:  # OSError, or a serializer's own error wrapping one (safetensors)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_names(directory)
        kept = f"; the last complete checkpoint is {previous[0]}" if previous else ""
        raise DsvlmError(f"could not write checkpoint {final}: {exc}{kept}") from exc
    accelerator.wait_for_everyone()
    return final


def latest_names(directory: Path) -> list[str]:
    """Complete checkpoints, newest first."""
    if not directory.is_dir():
        return []
    done = [p for p in directory.glob("step-*") if (p / STATE_FILE).is_file()]
    return [p.name for p in sorted(done, key=lambda p: p.name, reverse=True)]


def prune(directory: Path, keep: int) -> None:
    for name in latest_names(directory)[keep:]:
        shutil.rmtree(directory / name, ignore_errors=True)


def load_latest(accelerator: Accelerator, directory: Path) -> dict[str, Any] | None:
    """Load the newest checkpoint that loads; warn about and skip corrupt ones. None if there is none."""
    for name in latest_names(directory):
        path = directory / name
        try:
            state = json.loads((path / STATE_FILE).read_text())
            accelerator.load_state(str(path))
        except Exception as exc:  # any failure means this checkpoint is unusable; try the previous one
            log.warning("skipping checkpoint %s: it does not load (%s)", path, exc)
            continue
        log.info("resumed from %s (step %d)", path, state["step"])
        return state
    return None
