"""Read a prepared dataset (the output of `dsvlm prepare`). Light on purpose: no torch, no `datasets`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dsvlm.data.common import FORMAT_VERSION, MANIFEST, SKIPPED, prepare_hint, sha256_file
from dsvlm.data.images import strict_truncation
from dsvlm.data.manifest import validate_manifest
from dsvlm.errors import DataError

log = logging.getLogger(__name__)
# Schema metadata of a split's Arrow copy: the sha256 of the parquet file it was made from.
SOURCE_KEY = b"dsvlm.parquet_sha256"
COPY_BATCH = 65_536  # rows per record batch: bounds the memory a conversion needs


def write_arrow_copy(parquet: Path, digest: str | None = None) -> Path:
    """An uncompressed Arrow IPC copy of a split's parquet file, next to it (`NAME.arrow`), written batch by batch
    and atomically. Training memory-maps it and reads one record at a time: random access into parquet would
    decompress a whole row group per record. `digest`: the parquet's sha256, if already known."""
    target = parquet.with_suffix(".arrow")
    source = pq.ParquetFile(parquet)
    schema = source.schema_arrow.with_metadata({SOURCE_KEY: digest or sha256_file(parquet)})
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in source.iter_batches(batch_size=COPY_BATCH):
                writer.write_batch(batch)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def mapped_table(path: Path) -> pa.Table:
    """The records of an Arrow IPC file, memory-mapped: pages are read on access and shared by every process
    that maps the file, so the table costs no memory of its own."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def parse_row(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as a record: `conversations` parsed back to a list of turns."""
    row["conversations"] = json.loads(row["conversations"])
    return row


class PreparedDataset:
    """A prepared dataset directory: manifest, one parquet file per split, images under `image_root`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise DataError(f"{self.path}: no prepared dataset (no such directory); {prepare_hint(self.path)}")
        if not manifest_path.is_file():
            raise DataError(f"{self.path}: not a prepared dataset (no {MANIFEST}); {prepare_hint(self.path)}")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{manifest_path}: malformed JSON at line {exc.lineno}; {prepare_hint(self.path)} --overwrite"
            ) from None
        version = self.manifest.get("format_version") if isinstance(self.manifest, dict) else None
        if version != FORMAT_VERSION:
            raise DataError(
                f"{manifest_path}: format_version {version!r}, but this dsvlm reads version {FORMAT_VERSION}; "
                f"prepare the data again with this version ({prepare_hint(self.path)} --overwrite)"
            )
        validate_manifest(self.manifest, self.path, f"{prepare_hint(self.path)} --overwrite")
        root = Path(self.manifest["image_root"])
        self.image_root = (root if root.is_absolute() else self.path / root).resolve()

    @property
    def splits(self) -> list[str]:
        """Split names, in manifest order."""
        return list(self.manifest["splits"])

    def split_file(self, split: str) -> Path:
        """The parquet file of a split; DataError naming the available splits if there is no such split."""
        info = self.manifest["splits"].get(split)
        if info is None:
            raise DataError(
                f"{self.path}: no split {split!r} (has: {', '.join(self.splits) or 'none'}); "
                f"prepare it with `dsvlm prepare llava {self.path} --{split} FILE --image-root DIR --overwrite`"
            )
        path = self.path / info["file"]
        if not path.is_file():
            raise DataError(f"{path}: missing split file of {self.path}; {prepare_hint(self.path)} --overwrite")
        return path

    def records(self, split: str) -> list[dict[str, Any]]:
        """All records of a split as Python objects, in input order (for small splits; training reads
        `split_source` per record instead)."""
        return [parse_row(row) for row in pq.read_table(self.split_file(split)).to_pylist()]

    def split_source(self, split: str) -> Path:
        """The file to read a split from record by record: its memory-mappable Arrow copy, made (again) from the
        parquet file when missing or made from another version of it. Where the dataset directory is read-only,
        the parquet file itself (then every process holds the decompressed table)."""
        parquet = self.split_file(split)
        digest = sha256_file(parquet)
        copy = parquet.with_suffix(".arrow")
        try:
            if (pa.ipc.open_file(pa.memory_map(str(copy))).schema.metadata or {}).get(SOURCE_KEY) == digest.encode():
                return copy
        except (OSError, pa.ArrowInvalid):  # missing, or cut short
            pass
        try:
            return write_arrow_copy(parquet, digest)
        except OSError as exc:
            log.warning(
                "%s: cannot write the Arrow copy of split %r (%s); every process reads the whole split "
                "into memory instead",
                self.path,
                split,
                exc,
            )
            return parquet

    def image_path(self, record: dict[str, Any]) -> Path:
        """The resolved image file of a record; DataError if it has none or it would leave the image root."""
        rel = record.get("image")
        if not rel:
            raise DataError(f"record {record.get('id')!r} has no image (a text-only record)")
        path = (self.image_root / rel).resolve()
        # prepare already rejected paths out of the root; checking again guards hand-edited parquet files
        if not path.is_relative_to(self.image_root):
            raise DataError(f"record {record.get('id')!r}: image {rel!r} is outside the image root {self.image_root}")
        return path

    def load_image(self, record: dict[str, Any]) -> Image.Image:
        """The record's image as an RGB PIL image."""
        path = self.image_path(record)
        try:
            with strict_truncation(), Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError:
            raise DataError(
                f"{path}: image of record {record.get('id')!r} is missing (the image root {self.image_root} "
                "changed since `dsvlm prepare`?)"
            ) from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # truncated, not an image
            raise DataError(
                f"{path}: image of record {record.get('id')!r} cannot be read ({exc}); it changed "
                "since `dsvlm prepare` checked it: restore it, or prepare the data again"
            ) from None

    @property
    def eval_files(self) -> dict[str, Path]:
        """Benchmark name -> MMBench-format parquet shipped with the dataset (the synthetic set has one)."""
        return {name: self.path / rel for name, rel in self.manifest.get("eval", {}).items()}

    def skipped(self) -> list[dict[str, Any]]:
        """The records `dsvlm prepare` skipped: {split, source, line, id, reason, detail} each."""
        path = self.path / SKIPPED
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}={info['records']}" for name, info in self.manifest["splits"].items())
        return f"PreparedDataset({str(self.path)!r}, {self.manifest['kind']}, {counts})"
