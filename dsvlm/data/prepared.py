"""Read a prepared dataset (the output of `dsvlm prepare`). Light on purpose: no torch, no `datasets`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image, ImageFile

from dsvlm.data.common import FORMAT_VERSION, MANIFEST, SKIPPED, prepare_hint
from dsvlm.data.manifest import validate_manifest
from dsvlm.errors import DataError


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
        """All records of a split, in input order; `conversations` parsed back to a list of turns."""
        rows = pq.read_table(self.split_file(split)).to_pylist()
        for row in rows:
            row["conversations"] = json.loads(row["conversations"])
        return rows

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
        # lmms-eval, once imported, lets PIL pad truncated images with grey: here a cut file is an error
        truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError:
            raise DataError(
                f"{path}: image of record {record.get('id')!r} is missing (the image root {self.image_root} "
                "changed since `dsvlm prepare`?)"
            ) from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # truncated, not an image
            raise DataError(f"{path}: image of record {record.get('id')!r} cannot be read ({exc}); it changed "
                            "since `dsvlm prepare` checked it: restore it, or prepare the data again") from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok

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
