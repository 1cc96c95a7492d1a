"""The prepared-dataset reader and the torch Dataset over a split."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dsvlm.data.common import PARQUET_SCHEMA
from dsvlm.data.dataset import PreparedSplit
from dsvlm.data.prepared import PreparedDataset
from dsvlm.data.synthetic import SyntheticConfig, prepare_synthetic
from dsvlm.errors import DataError


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_synthetic(out, SyntheticConfig(n_align=20, n_instruct=200, n_eval=5), progress=False)
    return out


def test_missing_dataset_says_how_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope: no prepared dataset .*dsvlm prepare synthetic"):
        PreparedDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: not a prepared dataset \(no manifest.json\).*dsvlm prepare llava"):
        PreparedDataset(tmp_path / "empty")


def test_bad_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(DataError, match="malformed JSON"):
        PreparedDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 2, "splits": {}}))
    with pytest.raises(DataError, match="format_version 2, but this dsvlm reads version 1"):
        PreparedDataset(tmp_path)


def _edit(manifest: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for part in parents:
        manifest = manifest[part]
    manifest[last] = value


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("splits.align.records", "many", r"splits\.align\.records: Input should be a valid integer"),
        ("splits.align.records", -3, r"splits\.align\.records: Input should be greater than or equal to 0"),
        ("splits.align", ["align.parquet"], r"splits\.align: Input should be a valid dictionary"),
        ("splits.align.file", "../../../etc/passwd", r"splits\.align\.file: Value error, must be a path relative"),
        ("splits.align.file", "/etc/passwd", r"splits\.align\.file: Value error, must be a path relative"),
        ("splits.align.file", "link.parquet", r"splits\.align\.file 'link\.parquet' resolves to .*outside"),
        ("eval.synthetic", "/tmp/x.parquet", r"eval\.synthetic: Value error, must be a path relative"),
        (
            "latents",
            {"dir": "..", "fingerprint": "f", "resolution": 32, "geometry": "pad", "shape": None, "images": 0},
            r"latents\.dir: Value error",
        ),
        ("image_root", "../../elsewhere", r"image_root '\.\./\.\./elsewhere' must be a path relative"),
        ("image_root", "", r"image_root: String should have at least 1 character"),
        ("kind", None, r"kind: Input should be a valid string"),
        ("splits", None, r"splits: Input should be a valid dictionary"),
    ],
)
def test_a_hand_edited_manifest_is_a_clean_error_naming_the_field(
    synthetic: Path, tmp_path: Path, field: str, value: object, message: str
) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic, data)
    (tmp_path / "outside.parquet").write_bytes((data / "align.parquet").read_bytes())
    (data / "link.parquet").symlink_to(tmp_path / "outside.parquet")
    manifest = json.loads((data / "manifest.json").read_text())
    _edit(manifest, field, value)
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=message):
        PreparedDataset(data)


def test_a_foreign_manifest_is_a_clean_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "name": "someone else's", "files": []}))
    with pytest.raises(DataError, match=r"manifest.json: not a valid Manifest \(kind: Field required; image_root"):
        PreparedDataset(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="format_version None"):
        PreparedDataset(tmp_path)


def test_an_image_cut_short_after_prepare_is_a_clean_error_naming_it(synthetic: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic, data)
    split = PreparedSplit(data, "align")
    image = split.dataset.image_path(split.record(0))
    image.write_bytes(image.read_bytes()[:60])
    with pytest.raises(DataError, match=rf"{image}: image of record .* cannot be read"):
        split[0]
    image.write_text("not an image")
    with pytest.raises(DataError, match=rf"{image}: image of record .* cannot be read"):
        split[0]


def test_missing_split(synthetic: Path) -> None:
    with pytest.raises(DataError, match=r"no split 'train' \(has: align, instruct\)"):
        PreparedDataset(synthetic).records("train")


def test_records_and_images(synthetic: Path) -> None:
    dataset = PreparedDataset(synthetic)
    assert dataset.splits == ["align", "instruct"]
    records = dataset.records("instruct")
    assert len(records) == 200
    record = records[0]
    assert set(record) == {"id", "image", "conversations", "width", "height", "length"}
    assert isinstance(record["conversations"], list) and record["conversations"][0]["from"] == "human"
    assert dataset.image_path(record) == (synthetic / "images" / record["image"]).resolve()
    assert dataset.load_image(record).mode == "RGB"
    assert "synthetic" in repr(dataset)


def test_image_path_stays_inside_the_root(synthetic: Path) -> None:
    dataset = PreparedDataset(synthetic)
    with pytest.raises(DataError, match="outside the image root"):
        dataset.image_path({"id": "x", "image": "../manifest.json"})
    with pytest.raises(DataError, match="outside the image root"):
        dataset.image_path({"id": "x", "image": "/etc/passwd"})
    with pytest.raises(DataError, match="no image"):
        dataset.image_path({"id": "x", "image": None})
    with pytest.raises(DataError, match="is missing"):
        dataset.load_image({"id": "x", "image": "gone.png"})


def test_grayscale_image_loads_as_rgb(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.new("L", (5, 7), 100).save(tmp_path / "images" / "g.png")
    table = pa.table(
        {"id": ["g"], "image": ["g.png"], "conversations": ["[]"], "width": [5], "height": [7], "length": [0]},
        schema=PARQUET_SCHEMA,
    )
    pq.write_table(table, tmp_path / "align.parquet")
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "kind": "llava",
                "image_root": str(tmp_path / "images"),
                "splits": {"align": {"file": "align.parquet", "records": 1, "skipped": {}}},
            }
        )
    )
    image = PreparedDataset(tmp_path).load_image(PreparedDataset(tmp_path).records("align")[0])
    assert image.mode == "RGB" and image.size == (5, 7)


def test_prepared_split_items(synthetic: Path) -> None:
    split = PreparedSplit(synthetic, "instruct")
    assert len(split) == 200
    assert split.lengths.tolist() == [r["length"] for r in PreparedDataset(synthetic).records("instruct")]
    item = split[3]
    assert set(item) == {"index", "id", "image", "conversations", "latent"}
    assert item["index"] == 3 and item["latent"] is None
    assert isinstance(item["image"], Image.Image) and item["image"].mode == "RGB"
    text_only = [i for i in range(len(split)) if split.record(i)["image"] is None]
    assert text_only, "the synthetic instruct set has text-only records"
    assert split[text_only[0]]["image"] is None
    # DataLoader workers receive the dataset pickled
    clone = pickle.loads(pickle.dumps(split))
    assert clone[3]["id"] == item["id"]
    batch = next(iter(torch.utils.data.DataLoader(split, batch_size=4, collate_fn=list)))
    assert [b["index"] for b in batch] == [0, 1, 2, 3]
