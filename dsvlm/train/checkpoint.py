"""Resumable checkpoints: accelerate's state (model safetensors, optimizer, scheduler, RNG) + trainer state.

A checkpoint is written under a temporary name and renamed when complete, so `step-N/` either exists
whole or not at all; `trainer_state.json` is its last file.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from dsvlm.errors import DsvlmError, RunFailure
from dsvlm.io import atomic_write_json
from dsvlm.train.collective import decided_on_main

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
    except BaseException as exc:  # OSError, a serializer's own error wrapping one (safetensors), Ctrl-C
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception):
            raise
        previous = latest_names(directory)
        kept = f"; the last complete checkpoint is {previous[0]}" if previous else ""
        raise RunFailure(f"could not write checkpoint {final}: {exc}{kept}") from exc
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


def _check_readable(path: Path) -> None:
    """Read every tensor and pickle of a checkpoint once, so that a truncated or corrupt file is found before
    any of it is applied to the model (accelerate loads the model first, the optimizer after: a failure half
    way would leave the model of one checkpoint with the optimizer of none)."""
    from accelerate.utils import load
    from safetensors import safe_open

    deepspeed = (path / "latest").is_file()  # DeepSpeed's engine writes `latest` next to its own .pt files
    for file in sorted(path.rglob("*")):
        if file.suffix == ".safetensors":
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    f.get_tensor(key)
        elif deepspeed and file.suffix == ".pt":
            # DeepSpeed pickles its own objects (not weights-only loadable): check the archive's CRCs instead.
            with zipfile.ZipFile(file) as archive:
                broken = archive.testzip()
            if broken is not None:
                raise OSError(f"{file.name}: {broken} is corrupt")
        elif file.suffix in (".bin", ".pkl", ".pt"):
            load(file, map_location="cpu")  # as accelerate loads them: weights only, no code runs


def _reason(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "..."


def load_latest(accelerator: Accelerator, directory: Path) -> dict[str, Any] | None:
    """Load the newest checkpoint whose files all read back; warn about and skip corrupt ones. None if there
    is none; an error listing each checkpoint and why when there are some and none loads. The main process
    chooses it, so every process loads the same one."""
    chosen = decided_on_main(lambda: _latest_readable(directory))
    if chosen is None:
        return None
    path, state = chosen
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # its files read back, yet it does not fit: the model may be half loaded
        raise DsvlmError(
            f"checkpoint {path} does not fit this run ({_reason(exc)}); nothing else was tried "
            "because the model may be partly loaded; start the stage over with --overwrite"
        ) from exc
    log.info("resumed from %s (step %d)", path, state["step"])
    return state


def _latest_readable(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint whose files all read back, and its trainer state."""
    failures = []
    for name in latest_names(directory):
        path = directory / name
        try:
            state = json.loads((path / STATE_FILE).read_text())
            _check_readable(path)
        except Exception as exc:  # any failure means this checkpoint is unusable; try the previous one
            log.warning("skipping checkpoint %s: it does not load (%s)", path, _reason(exc))
            failures.append(f"{name}: {_reason(exc)}")
            continue
        return path, state
    if failures:
        listed = "\n  ".join(failures)
        raise DsvlmError(
            f"no checkpoint in {directory} loads:\n  {listed}\nremove them to start the stage over, "
            "or pass --overwrite instead of --resume"
        )
    return None
