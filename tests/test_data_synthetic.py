"""The synthetic set: determinism, content, the MMBench-format eval parquet, the vocabulary."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dsvlm.data.common import TOKEN_PATTERN
from dsvlm.data.prepared import PreparedDataset
from dsvlm.data.synthetic import (
    MC_OPTIONS,
    MMBENCH_POST_PROMPT,
    SyntheticConfig,
    generate_synthetic,
    mmbench_prompt,
    prepare_synthetic,
    synthetic_vocabulary,
)
from dsvlm.errors import DataError

SMALL = {"n_align": 40, "n_instruct": 60, "n_eval": 30}
ALL_TYPES = {"question_types": list(MC_OPTIONS), "option_order": "shuffled", "max_objects": 4}
MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "L2-category",
                   "source", "split", "image"]


def _tree_digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix not in skip
    }


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "data"
    prepare_synthetic(out, SyntheticConfig(**SMALL), progress=False)
    return out


def test_generation_is_deterministic_by_seed(tmp_path: Path) -> None:
    a = generate_synthetic(tmp_path / "a", SyntheticConfig(**SMALL, seed=3))
    generate_synthetic(tmp_path / "b", SyntheticConfig(**SMALL, seed=3))
    generate_synthetic(tmp_path / "c", SyntheticConfig(**SMALL, seed=4))
    # JSON files and PNGs are byte-identical; the eval parquet is compared by content
    assert _tree_digest(tmp_path / "a", skip=(".parquet",)) == _tree_digest(tmp_path / "b", skip=(".parquet",))
    assert pq.read_table(a["eval"]).equals(pq.read_table(tmp_path / "b" / "eval" / "synthetic.parquet"))
    assert (tmp_path / "a" / "align.json").read_bytes() != (tmp_path / "c" / "align.json").read_bytes()
    assert not pq.read_table(a["eval"]).equals(pq.read_table(tmp_path / "c" / "eval" / "synthetic.parquet"))


def test_sizes_do_not_shift_other_parts(tmp_path: Path) -> None:
    generate_synthetic(tmp_path / "a", SyntheticConfig(n_align=10, n_instruct=20, n_eval=5))
    generate_synthetic(tmp_path / "b", SyntheticConfig(n_align=15, n_instruct=20, n_eval=5))
    assert (tmp_path / "a" / "instruct.json").read_text() == (tmp_path / "b" / "instruct.json").read_text()
    assert json.loads((tmp_path / "b" / "align.json").read_text())[:10] == json.loads(
        (tmp_path / "a" / "align.json").read_text()
    )


def test_prepared_layout_and_manifest(synthetic: Path) -> None:
    dataset = PreparedDataset(synthetic)
    manifest = dataset.manifest
    assert manifest["kind"] == "synthetic"
    assert manifest["image_root"] == "images"
    assert manifest["eval"] == {"synthetic": "eval/synthetic.parquet"}
    assert manifest["options"] == {**SMALL, "seed": 0, "image_size": 32, "question_types": ["colour", "count"],
                                   "option_order": "canonical", "max_objects": 2, "workers": 1}
    assert {name: s["records"] for name, s in manifest["splits"].items()} == {"align": 40, "instruct": 60}
    assert all(s["skipped"] == {} for s in manifest["splits"].values())
    assert manifest["splits"]["align"]["source"]["path"] == "align.json"
    assert dataset.eval_files == {"synthetic": synthetic / "eval" / "synthetic.parquet"}
    assert (synthetic / "skipped.jsonl").read_text() == ""
    assert not [p for p in synthetic.parent.iterdir() if p.name.startswith(".")]

    align = dataset.records("align")
    first = align[0]
    assert first["conversations"][0]["value"].startswith("<image>\n")
    assert first["conversations"][1]["value"].startswith("a ") and first["conversations"][1]["value"].endswith(".")
    image = dataset.load_image(first)
    assert image.size == (32, 32) and image.mode == "RGB"
    assert (first["width"], first["height"]) == (32, 32)


def test_instruct_opens_with_the_lmms_eval_prompt(synthetic: Path) -> None:
    records = PreparedDataset(synthetic).records("instruct")
    with_image = [r for r in records if r["image"] is not None]
    assert len(with_image) < len(records) or len(records) < 100  # ~2 % text-only; may be none in 60
    counts = Counter()
    for record in with_image:
        turns = record["conversations"]
        human, answer = turns[0]["value"], turns[1]["value"]
        assert human.startswith("<image>\n")
        assert human.endswith("\n\nAnswer with the option's letter from the given choices directly.")
        assert " There are several options:\nA. " in human
        assert answer in "ABCD" and len(answer) == 1
        options = dict(line.split(". ", 1) for line in human.split("\n") if line[:3] in ("A. ", "B. ", "C. ", "D. "))
        # canonical order: each question type always lists its options in the same order
        assert tuple(options.values()) in (MC_OPTIONS["colour"], MC_OPTIONS["count"])
        counts[len(turns) // 2] += 1
    assert set(counts) > {1}  # multi-turn records exist


def test_shuffled_option_order_and_all_question_types(tmp_path: Path) -> None:
    generate_synthetic(tmp_path, SyntheticConfig(n_align=5, n_instruct=200, n_eval=5, **ALL_TYPES))
    records = json.loads((tmp_path / "instruct.json").read_text())
    orders = set()
    for record in records:
        if "image" not in record:
            continue
        human = record["conversations"][0]["value"]
        orders.add(tuple(line[3:] for line in human.split("\n") if line[:3] in ("A. ", "B. ", "C. ", "D. ")))
    assert len(orders) > 4  # the same option set appears in several orders
    assert max(len(r["conversations"]) for r in records) >= 6


def test_eval_parquet_is_mmbench_format(synthetic: Path) -> None:
    import datasets

    eval_file = synthetic / "eval" / "synthetic.parquet"
    loaded = datasets.load_dataset("parquet", data_files={"dev": str(eval_file)}, split="dev")
    assert loaded.column_names == MMBENCH_COLUMNS
    assert len(loaded) == 30
    row = loaded[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (32, 32)
    assert row["hint"] is None and row["split"] == "dev"
    assert row["answer"] in "ABCD" and row[row["answer"]] is not None
    assert set(loaded["category"]) <= {"colour", "count"}
    assert loaded["index"] == list(range(30))
    assert {(r["A"], r["B"], r["C"], r["D"]) for r in loaded.remove_columns("image")} <= {
        MC_OPTIONS["colour"], MC_OPTIONS["count"]}


def test_eval_prompt_matches_lmms_eval(synthetic: Path) -> None:
    en_utils = pytest.importorskip("lmms_eval.tasks.mmbench.en_utils")
    import datasets

    loaded = datasets.load_dataset("parquet", data_files={"dev": str(synthetic / "eval" / "synthetic.parquet")},
                                   split="dev")
    kwargs = {"pre_prompt": "", "post_prompt": MMBENCH_POST_PROMPT}
    vocabulary = set(synthetic_vocabulary())
    for doc in loaded.select(range(10)):
        expected = en_utils.mmbench_doc_to_text(doc, kwargs)
        options = {k: doc[k] for k in "ABCD" if doc[k] is not None}
        assert mmbench_prompt(doc["question"], options) == expected
        assert set(TOKEN_PATTERN.findall(expected)) <= vocabulary


def test_vocabulary_covers_every_text(tmp_path: Path) -> None:
    generate_synthetic(tmp_path, SyntheticConfig(n_align=300, n_instruct=600, n_eval=50, **ALL_TYPES))
    vocabulary = synthetic_vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    texts = [turn["value"]
             for name in ("align.json", "instruct.json")
             for record in json.loads((tmp_path / name).read_text())
             for turn in record["conversations"]]
    table = pq.read_table(tmp_path / "eval" / "synthetic.parquet").drop(["image"]).to_pylist()
    texts += [mmbench_prompt(row["question"], {k: row[k] for k in "ABCD" if row[k]}) for row in table]
    used = {token for text in texts for token in TOKEN_PATTERN.findall(text)}
    assert used <= set(vocabulary), used - set(vocabulary)
    # tight: nearly every vocabulary entry does occur
    assert len(set(vocabulary) - used) <= 3, set(vocabulary) - used
    for word in ("Answer", "option", "'", "letter", "directly", "There", "several", ":", "A", "D", "red", "two"):
        assert word in vocabulary


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"question_types": ["colour", "texture"]}, "unknown question type"),
        ({"question_types": []}, "at least one"),
        ({"option_order": "random"}, "--option-order"),
        ({"max_objects": 5}, "--max-objects"),
        ({"image_size": 8}, "--image-size"),
        ({"n_align": 0}, "--n-align"),
    ],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        SyntheticConfig(**{**SMALL, **kwargs})
