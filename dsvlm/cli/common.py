"""Shared CLI plumbing: the stderr console, logging, debug state."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from rich.logging import RichHandler
from rich.markup import escape

from dsvlm.console import console
from dsvlm.errors import DsvlmError

__all__ = ["STATE", "DsvlmError", "console", "escape", "setup_logging"]


@dataclass
class _State:
    debug: bool = False


STATE = _State()


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr through rich; quiet the chatty libraries (their tqdm bars, warnings) unless debugging."""
    if level > logging.DEBUG:  # set before transformers/diffusers are imported: they read these once
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, markup=False)],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "PIL", "lmms-eval", "accelerate"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
