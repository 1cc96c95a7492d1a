"""The torch Dataset over one split of a prepared dataset."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from torch.utils.data import Dataset, Subset

from dsvlm.data.latents import LatentCache, rebuild_hint
from dsvlm.data.prepared import PreparedDataset, mapped_table, parse_row
from dsvlm.errors import DataError


class PreparedSplit(Dataset):
    """Records of one split: id, RGB image (None for text-only records), turns, and the cached VAE latent.

    Reads each record when asked for it from the split's memory-mapped Arrow copy, so it holds nothing per
    record: the pages are shared by the DataLoader workers, which get this object pickled (the path only) and
    map the file again. Images are decoded per item, in the worker that asks.
    """

    def __init__(self, dataset_dir: Path | str, split: str, latents: LatentCache | None = None) -> None:
        self.dataset = PreparedDataset(dataset_dir)
        self.split = split
        self.source = self.dataset.split_source(split)
        self.latents = latents
        self._table: pa.Table | None = None
        self._size = self.table.num_rows
        if latents is not None:
            images = self.table.column("image")
            cached = latents.images.column("image").combine_chunks()  # the mapped column: no Python copy
            missing = pc.filter(images, pc.and_(pc.is_valid(images), pc.invert(pc.is_in(images, value_set=cached))))
            if len(missing):
                raise DataError(
                    f"{latents.directory}: {len(missing)} image(s) of split {split!r} are not in the latent cache "
                    f"(e.g. {missing[0].as_py()!r}); it is stale: {rebuild_hint(self.dataset.path)}"
                )

    @property
    def table(self) -> pa.Table:
        """The split's records as an Arrow table, opened once per process."""
        if self._table is None:
            self._table = mapped_table(self.source) if self.source.suffix == ".arrow" else pq.read_table(self.source)
        return self._table

    @property
    def lengths(self) -> np.ndarray:
        """Words per record, for length grouping."""
        return self.table.column("length").to_numpy()

    @property
    def has_image(self) -> np.ndarray:
        """Whether each record has an image (else it is text-only), for modality grouping."""
        return pc.is_valid(self.table.column("image")).to_numpy(zero_copy_only=False)

    def record(self, index: int) -> dict[str, Any]:
        """One stored record, `conversations` parsed: {id, image, conversations, width, height, length}."""
        if not 0 <= index < self._size:
            raise IndexError(f"record {index} of a split of {self._size}")
        return parse_row(self.table.slice(index, 1).to_pylist()[0])

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.record(index)
        has_image = record["image"] is not None
        return {
            "index": index,
            "id": record["id"],
            "image": self.dataset.load_image(record) if has_image else None,
            "conversations": record["conversations"],  # parsed afresh per item: a collator may edit it
            "latent": self.latents.get_image(record["image"]) if has_image and self.latents is not None else None,
        }

    def __getstate__(self) -> dict[str, Any]:
        # Workers map the file again: a pickled table would copy every record into each of them.
        return {**self.__dict__, "_table": None}


def fixed_subset(split: PreparedSplit, size: int) -> Subset:
    """`size` records of the split: the first `size` of a permutation seeded by the split's name alone, so
    runs of any seed train on the same records and a smaller subset lies inside a larger one (a controlled
    low-data comparison varies only the size). Items keep their index in the whole split."""
    if size > len(split):
        raise DataError(f"max_records {size} exceeds the {len(split)} records of split {split.split!r}")
    order = list(range(len(split)))
    # String seeds are hashed with SHA-512 by `random`: stable across runs and Python versions.
    random.Random(f"dsvlm-subset/{split.split}").shuffle(order)
    return Subset(split, sorted(order[:size]))
