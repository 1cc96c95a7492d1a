"""Shared CLI plumbing: the stderr console, logging, debug state, and `emit` for results on stdout."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import TextIO

from rich.logging import RichHandler
from rich.markup import escape

from dsvlm.console import console
from dsvlm.errors import DsvlmError

__all__ = ["STATE", "DsvlmError", "console", "emit", "escape", "results_stream", "setup_logging"]


@dataclass
class _State:
    debug: bool = False
    results: TextIO | None = None  # stdout as the command found it; sys.stdout is stderr while a command runs


def results_stream() -> TextIO:
    """Where results go: the command's real stdout (`dsvlm` sends what libraries print there to stderr)."""
    return STATE.results or sys.stdout


def emit(text: str, nl: bool = True) -> None:
    """Write a result a pipeline consumes (a path, JSON) to stdout."""
    stream = results_stream()
    stream.write(text + ("\n" if nl else ""))
    stream.flush()


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
