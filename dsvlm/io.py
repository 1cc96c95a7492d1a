"""Atomic writes: a reader (or a crash) never sees a half-written file or directory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsvlm.errors import DsvlmError


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, data: Any, *, ensure_ascii: bool = True) -> None:
    """`data` as indented JSON, written atomically. `ensure_ascii=False` keeps non-ASCII text (user paths in a
    dataset manifest) readable instead of escaping it."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str, ensure_ascii=ensure_ascii) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block completes; on any error (Ctrl-C
    included) it is removed and `path` is left as it was.

    With `replace`, an existing `path` is swapped out by renames and deleted only after the new one is in
    place: a crash leaves the old directory or the new one at `path` (or, between the two renames, none).
    Without it, a `path` that exists when the block completes is an error (another process wrote it).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if not path.exists():
            tmp.replace(path)
            return
        if not replace:
            raise DsvlmError(f"{path} appeared while it was being written (another process?); nothing was replaced")
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)  # left by a crashed run: the rename needs a free name
        path.replace(old)
        try:
            tmp.replace(path)
        except BaseException:
            old.replace(path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
