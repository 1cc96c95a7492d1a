"""The one stderr console every layer writes tables, progress bars and logs to (so their lines never interleave).

Low on purpose: library modules (data, model, train) import it from here, never from the CLI layer.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def progress_bar(enabled: bool, info: bool = False) -> Progress:
    """The one progress bar: description, bar, done/total, elapsed and remaining time, and with `info` a free
    `info` field per task (training shows its latest losses there). Use it as a context manager; disabled, it
    prints nothing."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, console=console, disable=not enabled)
