"""A split is read per record from its memory-mapped Arrow copy: nothing per record held in Python, small to
pickle into DataLoader workers, the same items as the parquet file holds."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import prepare_small_synthetic
from torch.utils.data import DataLoader

from dsvlm.data.common import FORMAT_VERSION, PARQUET_SCHEMA
from dsvlm.data.dataset import PreparedSplit, fixed_subset
from dsvlm.data.prepared import SOURCE_KEY
from dsvlm.train.loop import LengthGroupedPermutation, epoch_sampler


def text_only_dataset(out: Path, records: int, salt: str = "") -> Path:
    """A prepared dataset of `records` text-only records, written directly in the prepared format."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    turns = [
        json.dumps([{"from": "human", "value": f"question {i}{salt}"}, {"from": "gpt", "value": "word " * (i % 17)}])
        for i in range(records)
    ]
    table = pa.table(
        {
            "id": [f"t{i}" for i in range(records)],
            "image": [None] * records,
            "conversations": turns,
            "width": [None] * records,
            "height": [None] * records,
            "length": [2 + i % 17 for i in range(records)],
        },
        schema=PARQUET_SCHEMA,
    )
    pq.write_table(table, out / "instruct.parquet", row_group_size=1000)
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "kind": "llava",
                "image_root": "images",
                "splits": {"instruct": {"file": "instruct.parquet", "records": records, "skipped": {}}},
            }
        )
    )
    return out


def parquet_items(dataset: Path, split: str) -> list[dict]:
    """The records as the old in-memory reader held them."""
    rows = pq.read_table(dataset / f"{split}.parquet").to_pylist()
    return [{**row, "conversations": json.loads(row["conversations"])} for row in rows]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_small_synthetic(tmp_path_factory.mktemp("streaming") / "data")


def test_items_equal_the_parquet_records(small: Path) -> None:
    assert (small / "instruct.arrow").is_file(), "prepare writes the Arrow copy training maps"
    for name in ("align", "instruct"):
        split = PreparedSplit(small, name)
        expected = parquet_items(small, name)
        assert split.source == small / f"{name}.arrow"
        assert [split.record(i) for i in range(len(split))] == expected
        item = split[len(split) - 1]
        assert item["id"] == expected[-1]["id"] and item["conversations"] == expected[-1]["conversations"]
        assert (item["image"] is None) == (expected[-1]["image"] is None)
        assert split.lengths.tolist() == [r["length"] for r in expected]
        assert split.has_image.tolist() == [r["image"] is not None for r in expected]
    with pytest.raises(IndexError):
        split.record(len(split))


def test_holds_nothing_per_record_and_pickles_small(tmp_path: Path) -> None:
    sizes = {}
    for records in (100, 20_000):
        split = PreparedSplit(text_only_dataset(tmp_path / str(records), records), "instruct")
        assert len(split) == records
        for name, value in vars(split).items():
            if isinstance(value, (list, tuple, dict, set)):
                assert len(value) < 100, f"{name} holds {len(value)} entries"
        sizes[records] = len(pickle.dumps(split))
        clone = pickle.loads(pickle.dumps(split))
        assert clone._table is None and clone[records - 1] == split[records - 1]
    assert sizes[20_000] < 4096 and abs(sizes[20_000] - sizes[100]) < 16, sizes


def test_two_workers_over_two_epochs(tmp_path: Path) -> None:
    split = fixed_subset(PreparedSplit(text_only_dataset(tmp_path, 300), "instruct"), 40)
    loader = DataLoader(
        split, batch_size=8, num_workers=2, persistent_workers=True, collate_fn=list, multiprocessing_context="fork"
    )
    for _ in range(2):
        ids = [item["id"] for batch in loader for item in batch]
        assert ids == [f"t{i}" for i in split.indices]


def test_a_stale_or_broken_copy_is_made_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = text_only_dataset(tmp_path, 50)
    first = PreparedSplit(data, "instruct")
    metadata = pa.ipc.open_file(pa.memory_map(str(first.source))).schema.metadata
    assert metadata[SOURCE_KEY]
    text_only_dataset(tmp_path, 50, salt="!")  # the parquet changed since the copy was made
    assert PreparedSplit(data, "instruct")[3]["conversations"][0]["value"] == "question 3!"
    (data / "instruct.arrow").write_bytes(b"cut")
    assert PreparedSplit(data, "instruct")[3]["conversations"][0]["value"] == "question 3!"
    # Where no copy can be written, the split is read from the parquet file (with a warning)
    (data / "instruct.arrow").unlink()
    (data / "instruct.arrow").mkdir()
    (data / "instruct.arrow" / "blocker").touch()
    with caplog.at_level(logging.WARNING):
        fallback = PreparedSplit(data, "instruct")
    assert fallback.source == data / "instruct.parquet" and "cannot write the Arrow copy" in caplog.text
    assert pickle.loads(pickle.dumps(fallback))[49]["conversations"][0]["value"] == "question 49!"


def test_length_grouping_reads_the_columns(small: Path) -> None:
    split = PreparedSplit(small, "instruct")
    for data in (split, fixed_subset(split, 24)):
        sampler = epoch_sampler(data, seed=3, group_by_length=True, group_size=4)
        assert isinstance(sampler, LengthGroupedPermutation)
        indices = data.indices if isinstance(data, torch.utils.data.Subset) else range(len(split))
        assert sampler.has_image == [split.record(i)["image"] is not None for i in indices]
        assert sampler.lengths == [split.record(i)["length"] for i in indices]
