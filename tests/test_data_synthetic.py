"""The synthetic set: determinism, content, the MMBench-format eval parquet, the vocabulary."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dsvlm.data.common import TOKEN_PATTERN
from dsvlm.data.prepared import PreparedDataset
from dsvlm.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    COUNT_WORDS,
    MC_OPTIONS,
    MMBENCH_POST_PROMPT,
    QUESTION_TYPES,
    Scene,
    Shape,
    SyntheticConfig,
    _choice,
    generate_synthetic,
    mmbench_prompt,
    prepare_synthetic,
    synthetic_vocabulary,
)
from dsvlm.errors import DataError

SMALL = {"n_align": 40, "n_instruct": 60, "n_eval": 30}
ALL_TYPES = {"question_types": list(MC_OPTIONS), "option_order": "shuffled", "max_objects": 4}
MMBENCH_COLUMNS = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "L2-category",
    "source",
    "split",
    "image",
]


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
    assert manifest["options"] == {
        **SMALL,
        "seed": 0,
        "image_size": 32,
        "question_types": list(QUESTION_TYPES),
        "option_order": "canonical",
        "max_objects": 2,
        "workers": 1,
    }
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
        assert tuple(options.values()) in MC_OPTIONS.values()
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
    assert set(loaded["category"]) <= set(QUESTION_TYPES) and len(set(loaded["category"])) > 3
    assert loaded["index"] == list(range(30))
    padded = {(*options, None, None, None, None)[:4] for options in MC_OPTIONS.values()}
    assert {(r["A"], r["B"], r["C"], r["D"]) for r in loaded.remove_columns("image")} <= padded


def test_eval_prompt_matches_lmms_eval(synthetic: Path) -> None:
    en_utils = pytest.importorskip("lmms_eval.tasks.mmbench.en_utils")
    import datasets

    loaded = datasets.load_dataset(
        "parquet", data_files={"dev": str(synthetic / "eval" / "synthetic.parquet")}, split="dev"
    )
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
    texts = [
        turn["value"]
        for name in ("align.json", "instruct.json")
        for record in json.loads((tmp_path / name).read_text())
        for turn in record["conversations"]
    ]
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


# What the pixels say: shapes are drawn without anti-aliasing in known colours on known backgrounds.
def blobs(image: Image.Image) -> list[tuple[str, list[tuple[int, int]]]]:
    """The shapes of a rendered image as (colour, pixels): 8-connected regions of one known colour."""
    names = {rgb: name for name, rgb in COLOURS.items()}
    assert not set(names) & set(BACKGROUNDS.values())
    width, height = image.size
    pixels = image.load()
    seen: set[tuple[int, int]] = set()
    found = []
    for start in ((x, y) for y in range(height) for x in range(width)):
        if start in seen or pixels[start] not in names:
            continue
        colour, region, todo = pixels[start], [], [start]
        seen.add(start)
        while todo:
            x, y = todo.pop()
            region.append((x, y))
            for nx in (x - 1, x, x + 1):
                for ny in (y - 1, y, y + 1):
                    if 0 <= nx < width and 0 <= ny < height and (nx, ny) not in seen and pixels[nx, ny] == colour:
                        seen.add((nx, ny))
                        todo.append((nx, ny))
        found.append((names[colour], region))
    return found


def eval_items(tmp_path: Path, kind: str, n: int = 60, **options: object) -> list[dict]:
    generate_synthetic(tmp_path, SyntheticConfig(n_align=1, n_instruct=1, n_eval=n, question_types=[kind], **options))
    import datasets

    rows = datasets.load_dataset("parquet", data_files=str(tmp_path / "eval" / "synthetic.parquet"), split="train")
    assert set(rows["category"]) == {kind}
    return list(rows)


def test_relative_position_answers_match_the_image(tmp_path: Path) -> None:
    relations = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
    pattern = re.compile(r"What colour is the shape (left of|right of|above|below) the (\w+) shape\?")
    seen = Counter()
    for row in eval_items(tmp_path, "relative_position"):
        relation, reference = pattern.fullmatch(row["question"]).groups()
        shapes = blobs(row["image"])
        assert len({colour for colour, _ in shapes}) == len(shapes) >= 2  # distinct colours name the shapes
        size = row["image"].size[0]
        centre = {colour: [sum(p[i] for p in px) / len(px) for i in (0, 1)] for colour, px in shapes}
        axis, sign = relations[relation]
        # on that side by more than half a grid step (0.125 of the side); jitter moves centres far less
        beyond = [c for c in centre if (centre[c][axis] - centre[reference][axis]) * sign > 0.125 * size]
        assert beyond == [row[row["answer"]]], row["question"]
        assert (row["A"], row["B"], row["C"], row["D"]) == tuple(COLOURS)
        seen[relation] += 1
    assert set(seen) == set(relations)


def test_relative_position_answers_for_known_scenes() -> None:
    def shape(colour: str, position: str) -> Shape:
        return Shape(colour, "circle", "large", position, 0.0, 0.0)

    # red top left, blue top right, green bottom left: "left of blue" (red and green) and "above green"
    # (red and blue) are ambiguous and must never be asked
    corners = Scene("white", (shape("red", "top left"), shape("blue", "top right"), shape("green", "bottom left")))
    pair = Scene("black", (shape("yellow", "top"), shape("red", "bottom")))
    expected = {
        corners: {
            ("right of", "red"): "blue",
            ("below", "red"): "green",
            ("below", "blue"): "green",
            ("right of", "green"): "blue",
        },
        pair: {("above", "red"): "yellow", ("below", "yellow"): "red"},
    }
    pattern = re.compile(r"What colour is the shape (.+) the (\w+) shape\?")
    for scene, answers in expected.items():
        asked = {}
        for seed in range(100):
            choice = _choice(random.Random(seed), scene, "relative_position", "canonical")
            asked[pattern.fullmatch(choice.question).groups()] = choice.options[choice.answer]
        assert asked == answers
    alone = Scene("white", (shape("red", "left"),))
    assert _choice(random.Random(0), alone, "relative_position", "canonical") is None


def test_relative_size_answers_match_the_image(tmp_path: Path) -> None:
    pattern = re.compile(r"Is the (\w+) shape larger or smaller than the (\w+) shape\?")
    answers = Counter()
    for row in eval_items(tmp_path, "relative_size"):
        first, second = pattern.fullmatch(row["question"]).groups()
        area = {colour: len(px) for colour, px in blobs(row["image"])}
        assert area[first] != area[second]
        assert row[row["answer"]] == ("larger" if area[first] > area[second] else "smaller")
        assert (row["A"], row["B"], row["C"], row["D"]) == ("larger", "smaller", None, None)
        answers[row["answer"]] += 1
    assert set(answers) == {"A", "B"}


def test_count_small_answers_match_the_image(tmp_path: Path) -> None:
    counts = Counter()
    for row in eval_items(tmp_path, "count_small"):
        shapes = blobs(row["image"])  # at 32 px: the tiny shapes never touch, each is its own region
        assert row["question"] == "How many tiny shapes are in the image?"
        assert row[row["answer"]] == COUNT_WORDS[len(shapes) - 1]
        assert max(len(px) for _, px in shapes) < 0.04 * 32 * 32  # smaller than the small shapes
        counts[len(shapes)] += 1
    assert set(counts) == {3, 4, 5, 6}


def test_count_small_follow_ups_name_one_shape(tmp_path: Path) -> None:
    """Colours repeat in count_small scenes: open questions that name a shape by colour must not be asked
    about a colour two shapes share, and the caption lists every shape."""
    generate_synthetic(tmp_path, SyntheticConfig(n_align=40, n_instruct=150, n_eval=1, question_types=["count_small"]))
    by_colour = re.compile(r"What shape is the (\w+) object\?|Do the (\w+) and (\w+) objects have the same shape\?")
    checked = 0
    for record in json.loads((tmp_path / "instruct.json").read_text()):
        if "image" not in record:
            continue
        colours = Counter(colour for colour, _ in blobs(Image.open(tmp_path / "images" / record["image"])))
        for turn in record["conversations"][2::2]:
            assert "small or large" not in turn["value"]  # tiny is neither
            match = by_colour.fullmatch(turn["value"])
            if match:
                assert all(colours[c] == 1 for c in match.groups() if c), (turn["value"], colours)
                checked += 1
    assert checked > 10
    for record in json.loads((tmp_path / "align.json").read_text()):
        caption = record["conversations"][1]["value"]
        shapes = blobs(Image.open(tmp_path / "images" / record["image"]))
        assert caption.count(" and ") + 1 == len(shapes) and caption.count("tiny") == len(shapes)
