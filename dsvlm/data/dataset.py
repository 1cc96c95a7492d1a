"""The torch Dataset over one split of a prepared dataset."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from dsvlm.data.latents import LatentCache, rebuild_hint
from dsvlm.data.prepared import PreparedDataset
from dsvlm.errors import DataError


class PreparedSplit(Dataset):
    """Records of one split: id, RGB image (None for text-only records), turns, and the cached VAE latent.

    Holds the records in memory (conversations parsed once); images are read from disk per item.
    """

    def __init__(self, dataset_dir: Path | str, split: str, latents: LatentCache | None = None) -> None:
        self.dataset = PreparedDataset(dataset_dir)
        self.split = split
        self.records: list[dict[str, Any]] = self.dataset.records(split)
        self.latents = latents
        self.lengths: list[int] = [r["length"] for r in self.records]  # words per record, for length grouping
        if latents is not None:
            missing = [r["image"] for r in self.records if r["image"] is not None and r["image"] not in latents]
            if missing:
                raise DataError(
                    f"{latents.directory}: {len(missing)} image(s) of split {split!r} are not in the latent cache "
                    f"(e.g. {missing[0]!r}); it is stale: {rebuild_hint(self.dataset.path)}"
                )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        has_image = record["image"] is not None
        return {
            "index": index,
            "id": record["id"],
            "image": self.dataset.load_image(record) if has_image else None,
            "conversations": [dict(turn) for turn in record["conversations"]],  # a collator may edit its copy
            "latent": self.latents.get_image(record["image"]) if has_image and self.latents is not None else None,
        }


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
