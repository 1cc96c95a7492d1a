"""VAE latent cache: every image of a prepared dataset encoded once, so training skips the VAE encoder.

Layout: `DATASET/latents/` holds `index.json` (metadata: version, VAE fingerprint, resolution, image geometry (pad /
crop to square), latent shape, shard names), `shard-NNNNN.safetensors` files each holding one float32 tensor
`latents` [N, C, h, w], and an uncompressed Arrow IPC table, memory-mapped by readers: `images.arrow` (image path,
sorted -> shard, row). Lookups binary-search the mapped column, so no process holds a per-image Python object (at
LLaVA's 624 K images a dict would be copied into every DataLoader worker). `LatentCache.open` refuses a cache
built for another VAE, resolution or geometry.
Latents are the deterministic posterior mean times `scaling_factor`, of the image made square by the geometry,
resized to resolution x resolution and scaled to [-1, 1] (`vae_input`).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsvlm.console import progress_bar
from dsvlm.data.common import MANIFEST
from dsvlm.data.geometry import SquareGeometry
from dsvlm.data.manifest import LatentIndex, check_inside, check_schema
from dsvlm.data.prepared import PreparedDataset, mapped_table
from dsvlm.errors import DataError, brief
from dsvlm.io import atomic_dir, atomic_write_json
from dsvlm.model.supervision.vae import encode, vae_input

LATENTS_DIR = "latents"
INDEX = "index.json"
IMAGES = "images.arrow"
SHARD_SIZE = 4096  # latents per shard: 64 MiB at SD's 4x32x32 float32
# 2: images made square by the recorded geometry before resizing; 3: the per-image lookup in a mapped Arrow table
CACHE_VERSION = 3
CHECK_ROWS = 65_536  # rows of the lookup table checked at once
IMAGES_SCHEMA = pa.schema([("image", pa.string()), ("shard", pa.uint32()), ("row", pa.uint32())])


def build_latent_cache(
    dataset_dir: Path | str,
    vae: Any,
    resolution: int,
    fingerprint: str,
    geometry: SquareGeometry,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every distinct image of every split once and write `latents/` (built in a temporary directory,
    then swapped in). Records the cache in the manifest and returns the updated manifest."""
    dataset = PreparedDataset(dataset_dir)
    paths = _distinct_images(dataset)
    was_training = vae.training
    vae.eval()
    try:
        with atomic_dir(dataset.path / LATENTS_DIR, replace=True) as tmp:
            shards, shape = _write_shards(tmp, dataset, paths, vae, resolution, geometry, batch_size, progress)
            metadata = {
                "version": CACHE_VERSION,
                "fingerprint": fingerprint,
                "resolution": resolution,
                "geometry": geometry.key,
                "shape": shape,
                "scaling_factor": float(vae.config.scaling_factor),
                "shards": shards,
            }
            write_index(tmp, metadata, paths)
    finally:
        vae.train(was_training)
    manifest = dataset.manifest
    manifest["latents"] = {
        "dir": LATENTS_DIR,
        "fingerprint": fingerprint,
        "resolution": resolution,
        "geometry": geometry.key,
        "shape": shape,
        "images": len(paths),
    }
    atomic_write_json(dataset.path / MANIFEST, manifest, ensure_ascii=False)
    return manifest


def _write_shards(
    directory: Path,
    dataset: PreparedDataset,
    paths: list[str],
    vae: Any,
    resolution: int,
    geometry: SquareGeometry,
    batch_size: int,
    progress: bool,
) -> tuple[list[str], list[int] | None]:
    """Encode `paths` into SHARD_SIZE-latent shard files in `directory`, in order (the i-th path is row
    i % SHARD_SIZE of shard i // SHARD_SIZE). Returns the shard file names and the shape of one latent (None
    without images)."""
    shards: list[str] = []
    shape: list[int] | None = None
    with progress_bar(progress) as bar:
        task = bar.add_task("encoding latents", total=len(paths))
        for start in range(0, len(paths), SHARD_SIZE):
            chunk = paths[start : start + SHARD_SIZE]
            parts = []
            for b in range(0, len(chunk), batch_size):
                batch = chunk[b : b + batch_size]
                pixels = torch.stack([vae_input(geometry(dataset.load_image({"image": p})), resolution) for p in batch])
                parts.append(encode(vae, pixels).cpu())
                bar.advance(task, len(batch))
            latents = torch.cat(parts)
            shape = list(latents.shape[1:])
            name = f"shard-{len(shards):05d}.safetensors"
            save_file({"latents": latents.contiguous()}, str(directory / name))
            shards.append(name)
    return shards, shape


def write_index(directory: Path, metadata: dict[str, Any], paths: list[str]) -> None:
    """The cache's index in `directory` (the temporary directory the cache is built in): `metadata` as index.json,
    and `images.arrow`, the i-th of `paths` at shard i // SHARD_SIZE, row i % SHARD_SIZE, sorted by path for
    binary search."""
    position = np.arange(len(paths), dtype=np.uint32)
    images = pa.table(
        [pa.array(paths, pa.string()), pa.array(position // SHARD_SIZE), pa.array(position % SHARD_SIZE)],
        schema=IMAGES_SCHEMA,
    )
    _write_table(directory / IMAGES, images.sort_by("image"))
    atomic_write_json(directory / INDEX, metadata, ensure_ascii=False)


def _write_table(path: Path, table: pa.Table) -> None:
    # Uncompressed IPC file: readers memory-map it and touch only the pages a lookup reads.
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _distinct_images(dataset: PreparedDataset) -> list[str]:
    """Every distinct image path over all splits, in order: records sharing an image share its latent."""
    images: dict[str, None] = {}  # an ordered set
    for split in dataset.splits:
        for record in dataset.records(split):
            if record["image"] is not None:
                images[record["image"]] = None
    return list(images)


@dataclass
class LatentRequest:
    """What `dsvlm prepare --latents` asks for: build a cache with this VAE once the dataset is written."""

    vae: Any
    resolution: int
    fingerprint: str
    geometry: SquareGeometry
    batch_size: int = 16

    def build(self, dataset_dir: Path, progress: bool = True) -> dict[str, Any]:
        return build_latent_cache(
            dataset_dir, self.vae, self.resolution, self.fingerprint, self.geometry, self.batch_size, progress
        )


def rebuild_hint(dataset_dir: Path) -> str:
    """How to get a cache that fits (for errors about a missing, mismatched or stale one)."""
    return (
        f"rebuild it with `dsvlm prepare latents {dataset_dir} RECIPE [overrides]` for the recipe you train, "
        "or train without it (data.use_latent_cache=false)"
    )


def _shard_rows(path: Path, shape: list[int] | None, hint: str) -> int:
    """How many latents the shard at `path` holds, after checking its header (a truncated file fails here) and
    that each latent has the index's `shape`."""
    try:
        stored = safe_open(str(path), "pt").get_slice("latents").get_shape()
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{path}: latent shard cannot be read ({exc}); {hint}") from None
    if shape is None or list(stored[1:]) != list(shape):
        raise DataError(f"{path}: latents of shape {list(stored[1:])}, but the index says {shape}; {hint}")
    return stored[0]


def _check_shards(directory: Path, index: dict[str, Any], images: pa.Table, hint: str) -> None:
    """Every shard the index names is inside the cache, readable and of the index's shape, and every image's
    [shard, row] points into one: the index is checked against the tensors, not trusted."""
    rows = np.array(
        [
            _shard_rows(check_inside(directory, name, directory / INDEX, "shards", hint), index["shape"], hint)
            for name in index["shards"]
        ],
        dtype=np.int64,
    )
    limits = np.append(rows, 0)  # a shard past the last one has 0 rows: every row in it is out of range
    for start in range(0, images.num_rows, CHECK_ROWS):  # in slices: bounded scratch memory at any size
        part = images.slice(start, CHECK_ROWS)
        shard, row = part.column("shard").to_numpy(), part.column("row").to_numpy()
        bad = np.flatnonzero(row >= limits[np.minimum(shard, len(rows))])
        if len(bad):
            first = int(bad[0])
            image = part.column("image")[first].as_py()
            raise DataError(
                f"{directory / IMAGES}: image {brief(image)} points at shard {shard[first]}, row {row[first]}, "
                f"which does not exist ({len(rows)} shard(s)); {hint}"
            )


def _mapped(path: Path, hint: str) -> pa.Table:
    """The cache's lookup table, memory-mapped: it costs page cache shared by every process, not memory."""
    try:
        return mapped_table(path)
    except (OSError, pa.ArrowInvalid) as exc:  # missing, cut short, not Arrow
        raise DataError(f"{path}: latent lookup table cannot be read ({exc}); {hint}") from None


def _checked_lookup(path: Path, hint: str) -> pa.Table:
    """The mapped lookup table at `path`, checked: its columns and types, no nulls, and its key (the image path)
    strictly increasing, so a binary search finds every key, once."""
    table = _mapped(path, hint)
    if not table.schema.remove_metadata().equals(IMAGES_SCHEMA):
        expected = IMAGES_SCHEMA.to_string()
        raise DataError(f"{path}: columns ({table.schema.to_string()}), expected ({expected}); {hint}")
    if any(column.null_count for column in table.columns):
        raise DataError(f"{path}: the latent lookup table has null entries; {hint}")
    keys = table.column(0)
    if len(keys) > 1 and not pc.all(pc.less(keys.slice(0, len(keys) - 1), keys.slice(1))).as_py():
        raise DataError(f"{path}: image column not sorted or not unique; {hint}")
    return table


class _Decoded:
    """A sorted string column as a sequence for `bisect`: one value decoded per probe, nothing held."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, at: int) -> str:
        return self.column[at].as_py()


def _find(keys: pa.ChunkedArray, key: str) -> int | None:
    """The row of `key` in a sorted, unique string column (O(log n) probes), or None."""
    at = bisect.bisect_left(_Decoded(keys), key)
    return at if at < len(keys) and keys[at].as_py() == key else None


class LatentCache:
    """Read access to a dataset's latent cache. Its lookup table and shards are memory-mapped lazily, per process:
    pickled into DataLoader workers, it carries the directory and index.json's metadata only."""

    def __init__(self, directory: Path, index: dict[str, Any], images: pa.Table | None = None) -> None:
        self.directory = directory
        self.index = index  # index.json: metadata, no per-image entries
        self.fingerprint: str = index["fingerprint"]
        self.resolution: int = index["resolution"]
        self.shape: tuple[int, ...] = tuple(index["shape"] or ())
        self._images = images
        self._handles: dict[int, Any] = {}

    @classmethod
    def open(cls, dataset_dir: Path | str, fingerprint: str, resolution: int, geometry: SquareGeometry) -> LatentCache:
        """Open the cache of `dataset_dir`; DataError if it is missing or was built for another VAE, resolution or
        image geometry."""
        dataset_dir = Path(dataset_dir)
        directory = dataset_dir / LATENTS_DIR
        try:
            index = json.loads((directory / INDEX).read_text())
        except FileNotFoundError:
            raise DataError(
                f"{dataset_dir}: no latent cache ({directory / INDEX} missing); build one with "
                f"`dsvlm prepare latents {dataset_dir} RECIPE [overrides]`"
            ) from None
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{directory / INDEX}: malformed JSON at line {exc.lineno}; {rebuild_hint(dataset_dir)}"
            ) from None
        version = index.get("version") if isinstance(index, dict) else None
        if version != CACHE_VERSION:
            raise DataError(
                f"{directory}: latent cache version {brief(version)} is not "
                f"{CACHE_VERSION}; {rebuild_hint(dataset_dir)}"
            )
        check_schema(LatentIndex, index, directory / INDEX, rebuild_hint(dataset_dir))
        if index["fingerprint"] != fingerprint:
            raise DataError(
                f"{directory}: the latent cache was built for another VAE (fingerprint "
                f"{index['fingerprint'][:12]}, this VAE {fingerprint[:12]}); {rebuild_hint(dataset_dir)}"
            )
        if index["resolution"] != resolution:
            raise DataError(
                f"{directory}: the latent cache was built at resolution {index['resolution']}, the recipe uses "
                f"{resolution} (supervision.resolution); {rebuild_hint(dataset_dir)}"
            )
        if index["geometry"] != geometry.key:
            raise DataError(
                f"{directory}: the latent cache was built with image geometry {index['geometry']}, the recipe uses "
                f"{geometry.key} (model.image_aspect_ratio); {rebuild_hint(dataset_dir)}"
            )
        images = _checked_lookup(directory / IMAGES, rebuild_hint(dataset_dir))
        _check_shards(directory, index, images, rebuild_hint(dataset_dir))
        return cls(directory, index, images)

    @property
    def images(self) -> pa.Table:
        """image (sorted), shard, row: the memory-mapped `images.arrow`, mapped once per process."""
        if self._images is None:
            self._images = _mapped(self.directory / IMAGES, rebuild_hint(self.directory.parent))
        return self._images

    def __len__(self) -> int:
        return self.images.num_rows

    def __contains__(self, image: object) -> bool:
        return isinstance(image, str) and self.locate(image) is not None

    def locate(self, image: str) -> tuple[int, int] | None:
        """(shard, row) of an image's latent, or None if the cache has none."""
        at = _find(self.images.column("image"), image)
        return None if at is None else (self.images.column("shard")[at].as_py(), self.images.column("row")[at].as_py())

    def get_image(self, image: str) -> torch.Tensor:
        """The latent [C, h, w] of an image, by its path relative to the image root (the record's `image`)."""
        location = self.locate(image)
        if location is None:
            raise DataError(
                f"{self.directory}: no latent for image {image!r}; the cache is stale, "
                f"{rebuild_hint(self.directory.parent)}"
            )
        shard, row = location
        path = self.directory / self.index["shards"][shard]
        try:
            handle = self._handles.get(shard)
            if handle is None:
                handle = self._handles[shard] = safe_open(str(path), "pt")
            return handle.get_slice("latents")[row]
        except (SafetensorError, OSError) as exc:  # replaced or cut short since the cache was opened
            raise DataError(
                f"{path}: latent shard cannot be read ({exc}); {rebuild_hint(self.directory.parent)}"
            ) from None

    def __getstate__(self) -> dict[str, Any]:
        # Safetensors handles don't pickle, and a pickled Arrow table would carry its data: DataLoader workers
        # map their own.
        return {**self.__dict__, "_handles": {}, "_images": None}
