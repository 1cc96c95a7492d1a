"""VAE latent cache: every image of a prepared dataset encoded once, so training skips the VAE encoder.

Layout: `DATASET/latents/index.json` + `shard-NNNNN.safetensors` files, each holding one float32 tensor
`latents` [N, C, h, w]. The index records the VAE fingerprint, resolution and image geometry (pad / crop to
square) it was built for; `LatentCache.open` refuses a cache built for another VAE, resolution or geometry.
Latents are the deterministic posterior mean times `scaling_factor`, of the image made square by the geometry,
resized to resolution x resolution and scaled to [-1, 1] (`vae_input`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsvlm.console import progress_bar
from dsvlm.data.common import MANIFEST
from dsvlm.data.geometry import SquareGeometry
from dsvlm.data.manifest import LatentIndex, check_inside, check_schema
from dsvlm.data.prepared import PreparedDataset
from dsvlm.errors import DataError, brief
from dsvlm.io import atomic_dir, atomic_write_json
from dsvlm.model.supervision.vae import encode, vae_input

LATENTS_DIR = "latents"
INDEX = "index.json"
SHARD_SIZE = 4096  # latents per shard: 64 MiB at SD's 4x32x32 float32
CACHE_VERSION = 2  # 2: images made square by the recorded geometry before resizing


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
    paths, ids = _distinct_images(dataset)
    was_training = vae.training
    vae.eval()
    try:
        with atomic_dir(dataset.path / LATENTS_DIR, replace=True) as tmp:
            shards, location, shape = _write_shards(
                tmp, dataset, paths, vae, resolution, geometry, batch_size, progress
            )
            index = {
                "version": CACHE_VERSION,
                "fingerprint": fingerprint,
                "resolution": resolution,
                "geometry": geometry.key,
                "shape": shape,
                "scaling_factor": float(vae.config.scaling_factor),
                "shards": shards,
                "images": location,
                "ids": ids,
            }
            atomic_write_json(tmp / INDEX, index, ensure_ascii=False)
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
) -> tuple[list[str], dict[str, list[int]], list[int] | None]:
    """Encode `paths` into SHARD_SIZE-latent shard files in `directory`. Returns the shard file names, image
    path -> [shard, row], and the shape of one latent (None without images)."""
    shards: list[str] = []
    location: dict[str, list[int]] = {}
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
            for row, rel in enumerate(chunk):
                location[rel] = [len(shards), row]
            shards.append(name)
    return shards, location, shape


def _distinct_images(dataset: PreparedDataset) -> tuple[list[str], dict[str, str]]:
    """Every distinct image path over all splits, in order (records sharing an image share its latent), and
    record id -> image path for the ids that name one image only."""
    images: dict[str, None] = {}  # an ordered set
    ids: dict[str, str] = {}
    ambiguous: set[str] = set()
    for split in dataset.splits:
        for record in dataset.records(split):
            if record["image"] is None:
                continue
            images[record["image"]] = None
            # The same id in two splits with different images (possible with real LLaVA mixes) can't be
            # looked up by id; such records are served by image path.
            if ids.setdefault(record["id"], record["image"]) != record["image"]:
                ambiguous.add(record["id"])
    for rid in ambiguous:
        del ids[rid]
    return list(images), ids


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


def _check_shards(directory: Path, index: dict[str, Any], hint: str) -> None:
    """Every shard the index names is inside the cache, readable and of the index's shape, and every image's
    [shard, row] points into one: the index is checked against the tensors, not trusted."""
    rows = [
        _shard_rows(check_inside(directory, name, directory / INDEX, "shards", hint), index["shape"], hint)
        for name in index["shards"]
    ]
    for image, (shard, row) in index["images"].items():
        if shard >= len(rows) or row >= rows[shard]:
            raise DataError(
                f"{directory / INDEX}: image {brief(image)} points at shard {shard}, row {row}, which "
                f"does not exist ({len(rows)} shard(s)); {hint}"
            )


class LatentCache:
    """Read access to a dataset's latent cache; shards are memory-mapped lazily, per process."""

    def __init__(self, directory: Path, index: dict[str, Any]) -> None:
        self.directory = directory
        self.index = index
        self.fingerprint: str = index["fingerprint"]
        self.resolution: int = index["resolution"]
        self.shape: tuple[int, ...] = tuple(index["shape"] or ())
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
        _check_shards(directory, index, rebuild_hint(dataset_dir))
        return cls(directory, index)

    def __len__(self) -> int:
        return len(self.index["images"])

    def __contains__(self, image: object) -> bool:
        return image in self.index["images"]

    def get_image(self, image: str) -> torch.Tensor:
        """The latent [C, h, w] of an image, by its path relative to the image root (the record's `image`)."""
        try:
            shard, row = self.index["images"][image]
        except KeyError:
            raise DataError(
                f"{self.directory}: no latent for image {image!r}; the cache is stale, "
                f"{rebuild_hint(self.directory.parent)}"
            ) from None
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

    def get(self, record_id: str) -> torch.Tensor:
        """The latent [C, h, w] of a record's image, by record id."""
        image = self.index["ids"].get(record_id)
        if image is None:
            raise DataError(
                f"{self.directory}: no latent for record id {record_id!r} (a text-only record, an id used in "
                "two splits with different images - look those up with get_image - or a stale cache)"
            )
        return self.get_image(image)

    def __getstate__(self) -> dict[str, Any]:
        # safetensors handles don't pickle; DataLoader workers reopen their own.
        return {**self.__dict__, "_handles": {}}
