"""`stages.N.max_records`: a fixed, seed-independent subset of a split for low-data runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import prepare_small_synthetic, tiny_overrides

from dsvlm.data.dataset import PreparedSplit, fixed_subset
from dsvlm.errors import DataError, DsvlmError, RecipeError
from dsvlm.recipe import load_recipe
from dsvlm.train.loop import TrainOptions, train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_small_synthetic(tmp_path_factory.mktemp("data") / "synthetic", n=48)


def ids(subset) -> list[str]:
    return [subset[i]["id"] for i in range(len(subset))]


def test_fixed_subset_is_seed_free_nested_and_keeps_indices(data):
    split = PreparedSplit(data, "instruct")
    small, large = fixed_subset(split, 10), fixed_subset(split, 20)
    assert len(small) == 10 and len(set(ids(small))) == 10
    assert set(ids(small)) < set(ids(large))
    assert ids(small) == ids(fixed_subset(PreparedSplit(data, "instruct"), 10))  # no run seed involved
    assert ids(small) != ids(split)[:10]  # spread over the split, not its head
    # an item keeps its index in the whole split: diffusion noise stays seeded per record
    assert all(split[small[i]["index"]]["id"] == small[i]["id"] for i in range(10))
    align = ids(fixed_subset(PreparedSplit(data, "align"), 10))
    assert [i.split("-")[1] for i in align] != [i.split("-")[1] for i in ids(small)]  # seeded by split name
    with pytest.raises(DataError, match="max_records 49 exceeds the 48 records of split 'instruct'"):
        fixed_subset(split, 49)


def test_training_sees_only_max_records(data, tmp_path):
    out = tmp_path / "run"
    recipe = load_recipe("tiny-synthetic", tiny_overrides(data, out, steps=2, **{"stages.0.max_records": 16}))
    train(recipe, TrainOptions(stages=["align"], progress=False))
    info = json.loads((out / "align" / "final" / "stage.json").read_text())
    assert (info["records"], info["steps"]) == (16, 2)
    # 16 records at batch 8: step 2 ends the first epoch (48 records would be a third of it)
    epochs = [json.loads(line)["epoch"] for line in (out / "align" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0.5, 1.0]


def test_max_records_errors(data, tmp_path):
    with pytest.raises(RecipeError, match="max_records 4 is smaller than one global batch"):
        load_recipe("tiny-synthetic", tiny_overrides(data, tmp_path, **{"stages.1.max_records": 4}))
    recipe = load_recipe("tiny-synthetic", tiny_overrides(data, tmp_path / "run", **{"stages.1.max_records": 100}))
    with pytest.raises(DsvlmError, match="stage instruct: max_records 100 exceeds the 48 records"):
        train(recipe, TrainOptions(progress=False))
    assert not (tmp_path / "run").exists()  # refused before anything was built or written
