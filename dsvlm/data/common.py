"""The on-disk layout of a prepared dataset and the helpers every writer shares (atomic output, hashing)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dsvlm.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
IMAGE_TOKEN = "<image>"
SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# The word pieces of the tiny model's word-level tokenizer (see synthetic_vocabulary).
TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]+")

PARQUET_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.string()),
        pa.field("conversations", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("length", pa.int32(), nullable=False),
    ]
)


def prepare_hint(path: Path | str) -> str:
    """The commands that create a prepared dataset at `path` (for 'not found' messages)."""
    return (
        f"run `dsvlm prepare synthetic {path}` (the built-in set) or "
        f"`dsvlm prepare llava {path} --align FILE --instruct FILE --image-root DIR`"
    )


def word_length(conversations: list[dict[str, str]]) -> int:
    """Whitespace words over all turns: LLaVA's cheap proxy for token length, used for length grouping."""
    return sum(len(turn["value"].split()) for turn in conversations)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and os.replace, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing OUT unless overwrite, and never replace a directory that is not a dataset."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    if not out.is_dir() or out.is_symlink():
        raise DataError(f"{out} exists and is a file or a symlink, not a dataset directory; remove it yourself")
    # --overwrite deletes the old OUT: only ever do that to a prepared dataset (or an empty folder), so a
    # mistyped OUT such as `.` or a home directory is never wiped.
    if not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not a prepared dataset (no {MANIFEST}); refusing to replace it")


def temp_dir(prefix: str, parent: Path) -> Path:
    """A fresh directory in `parent` with the usual permissions (mkdtemp's 0700 would end up on the dataset)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    return path


@contextlib.contextmanager
def atomic_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success it becomes `out`, on any error it is removed.

    An existing `out` (only with overwrite) stays in place until the new one is complete, then the two are
    swapped by renames; a crash at any point leaves either the old dataset or no OUT, never a partial one.
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(f".{out.name}.tmp-", out.parent)
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()  # only the unique name is wanted: rename needs a free target
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        # BaseException: Ctrl-C during a long prepare must clean up too.
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def progress_bar(enabled: bool) -> Progress:
    """A rich progress bar on the shared stderr console (the one the CLI logs to, so lines don't interleave)."""
    from dsvlm.cli.common import console

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )
