"""The on-disk layout of a prepared dataset and the helpers every writer shares (atomic output, hashing)."""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from dsvlm.io import atomic_dir
from dsvlm.outputs import DATASET, check_output, writer_lock

FORMAT_VERSION = 1
MANIFEST = DATASET.marker
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
    """Now, in UTC, to the second (a manifest's `created`)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (sources can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory next to `out` that becomes `out` once the `with` block completes (`atomic_dir`),
    under `out`'s writer lock and after `check_output`: an existing dataset is replaced only with overwrite (an
    empty folder always), and stays until the new one is complete; an error, Ctrl-C included, leaves no
    partial dataset."""
    out = Path(out)
    with writer_lock(out):
        check_output(out, DATASET, overwrite)
        with atomic_dir(out, replace=out.exists()) as tmp:
            yield tmp
