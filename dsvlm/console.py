"""The one stderr console every layer writes tables, progress bars and logs to (so their lines never interleave).

Low on purpose: library modules (data, model, train) import it from here, never from the CLI layer.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)


def step_progress(enabled: bool) -> Progress:
    """A bar for step-counted work (training, pretraining) with a free `info` field for the latest losses; use it
    as a context manager. Disabled, it prints nothing."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=console, disable=not enabled)
