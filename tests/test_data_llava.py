"""Validation and preparation of LLaVA-format data, each failure mode with a real bad file on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dsvlm.data import llava
from dsvlm.data.llava import prepare_llava, summary_table
from dsvlm.data.prepared import PreparedDataset
from dsvlm.errors import DataError, DsvlmError


def write_png(path: Path, size: tuple[int, int] = (24, 16), seed: int = 0) -> Path:
    """A noise PNG (noise: big IDAT, so a truncated copy really is missing pixel data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def caption(rid: str, image: str | None = "ok.png", text: str = "<image>\nDescribe.") -> dict:
    record = {"id": rid, "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "a cat."}]}
    if image is not None:
        record["image"] = image
    return record


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    write_png(images / "ok.png")
    write_png(images / "sub" / "other.png", size=(10, 12), seed=1)
    return images


def _truncated(root: Path) -> str:
    data = write_png(root / "full.png", size=(64, 64)).read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    return "truncated.png"


def _not_an_image(root: Path) -> str:
    (root / "text.png").write_text("this is not a png")
    return "text.png"


def _empty(root: Path) -> str:
    (root / "empty.png").write_bytes(b"")
    return "empty.png"


def _outside(root: Path) -> str:
    write_png(root.parent / "outside.png")
    return "../outside.png"


def _absolute(root: Path) -> str:
    return str(write_png(root.parent / "outside.png"))


def _symlink_out(root: Path) -> str:
    os.symlink(write_png(root.parent / "outside.png"), root / "link.png")
    return "link.png"


def _symlink_dir_out(root: Path) -> str:
    write_png(root.parent / "elsewhere" / "x.png")
    os.symlink(root.parent / "elsewhere", root / "linked")
    return "linked/x.png"


# case -> (bad record (a function of the image root when it needs files), expected reason)
CASES = {
    "malformed_json": ('{"id": "bad", "conversations": [', "malformed_json"),
    "not_an_object": ('["a", "list"]', "not_an_object"),
    "missing_id": ({"image": "ok.png", "conversations": caption("x")["conversations"]}, "missing_id"),
    "conversations_missing": ({"id": "bad", "image": "ok.png"}, "empty_conversations"),
    "conversations_empty": ({"id": "bad", "image": "ok.png", "conversations": []}, "empty_conversations"),
    "gpt_first": (
        {
            "id": "bad",
            "image": "ok.png",
            "conversations": [{"from": "gpt", "value": "<image>\nhi"}, {"from": "human", "value": "x"}],
        },
        "turn_order",
    ),
    "two_humans": (
        {
            "id": "bad",
            "image": "ok.png",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "human", "value": "q2"}],
        },
        "turn_order",
    ),
    "ends_with_human": (
        {"id": "bad", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nq"}]},
        "turn_order",
    ),
    "unknown_role": (
        {
            "id": "bad",
            "image": "ok.png",
            "conversations": [{"from": "user", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        },
        "bad_turn",
    ),
    "image_token_missing": (caption("bad", text="Describe."), "image_token_missing"),
    "image_token_not_first_turn": (
        {
            "id": "bad",
            "image": "ok.png",
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
                {"from": "human", "value": "<image>\nq"},
                {"from": "gpt", "value": "a"},
            ],
        },
        "image_token_missing",
    ),
    "image_token_repeated": (caption("bad", text="<image>\n<image>\nDescribe."), "image_token_repeated"),
    "image_token_text_only": (caption("bad", image=None), "image_token_unexpected"),
    "image_not_string": (caption("bad", image=["ok.png"]), "bad_image_path"),
    "image_missing": (caption("bad", image="nope.png"), "image_missing"),
    "image_truncated": (lambda root: caption("bad", image=_truncated(root)), "image_corrupt"),
    "image_not_an_image": (lambda root: caption("bad", image=_not_an_image(root)), "image_corrupt"),
    "image_zero_bytes": (lambda root: caption("bad", image=_empty(root)), "image_empty"),
    "path_dotdot": (lambda root: caption("bad", image=_outside(root)), "path_escape"),
    "path_absolute": (lambda root: caption("bad", image=_absolute(root)), "path_escape"),
    "path_symlink_out": (lambda root: caption("bad", image=_symlink_out(root)), "path_escape"),
    "path_symlink_dir_out": (lambda root: caption("bad", image=_symlink_dir_out(root)), "path_escape"),
    "duplicate_id": (caption("good-1", image="sub/other.png"), "duplicate_id"),
    "too_deep": ('{"id": "bad", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "too_deep"),
    "too_large": (json.dumps(caption("bad", text="<image>\n" + "x" * llava.MAX_RECORD_CHARS)), "too_large"),
}


def _case_file(tmp_path: Path, root: Path, case: str) -> tuple[Path, str, str | None]:
    bad, reason = CASES[case]
    bad = bad(root) if callable(bad) else bad
    source = write_jsonl(tmp_path / f"{case}.jsonl", [caption("good-1"), bad, caption("good-3")])
    bad_id = bad.get("id") if isinstance(bad, dict) else None
    return source, reason, bad_id


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_is_skipped_and_reported(tmp_path: Path, root: Path, case: str) -> None:
    source, reason, bad_id = _case_file(tmp_path, root, case)
    out = tmp_path / "out"
    manifest = prepare_llava(out, {"instruct": source}, root, progress=False)
    split = manifest["splits"]["instruct"]
    assert split["records"] == 2
    assert split["skipped"] == {reason: 1}
    skipped = PreparedDataset(out).skipped()
    assert len(skipped) == 1
    assert skipped[0]["reason"] == reason
    assert skipped[0]["line"] == 2 and skipped[0]["index"] == 1
    assert skipped[0]["split"] == "instruct"
    assert skipped[0]["source"] == str(source.resolve())
    assert skipped[0]["detail"]
    if reason != "duplicate_id":
        assert skipped[0]["id"] == bad_id
    assert [r["id"] for r in PreparedDataset(out).records("instruct")] == ["good-1", "good-3"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_strict_stops_at_the_bad_record(tmp_path: Path, root: Path, case: str) -> None:
    source, reason, bad_id = _case_file(tmp_path, root, case)
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare_llava(out, {"instruct": source}, root, strict=True, progress=False)
    message = str(info.value)
    assert str(source.resolve()) in message
    assert "line 2" in message
    assert reason in message
    if bad_id is not None:
        assert repr(bad_id) in message or bad_id in message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_truncated_image_is_found_even_after_lmms_eval_is_imported(tmp_path: Path, root: Path) -> None:
    from PIL import ImageFile

    source = write_jsonl(tmp_path / "t.jsonl", [caption("a"), caption("b", image=_truncated(root))])
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # what importing lmms_eval.api.task does
    try:
        manifest = prepare_llava(tmp_path / "out", {"align": source}, root, progress=False)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert manifest["splits"]["align"]["skipped"] == {"image_corrupt": 1}


def test_symlinks_inside_the_root_are_fine(tmp_path: Path, root: Path) -> None:
    os.symlink(root / "ok.png", root / "alias.png")
    os.symlink(root / "sub", root / "subalias")
    source = write_jsonl(
        tmp_path / "links.jsonl", [caption("a", image="alias.png"), caption("b", image="subalias/other.png")]
    )
    manifest = prepare_llava(tmp_path / "out", {"align": source}, root, strict=True, progress=False)
    assert manifest["splits"]["align"]["records"] == 2


def test_strict_reports_the_earliest_problem(tmp_path: Path, root: Path) -> None:
    # line 2: missing image (found by the image pass), line 3: turn order (found by the structure pass)
    source = write_jsonl(
        tmp_path / "mixed.jsonl", [caption("a"), caption("b", image="nope.png"), CASES["gpt_first"][0]]
    )
    with pytest.raises(DataError, match=r"line 2 \(id b\): image_missing"):
        prepare_llava(tmp_path / "out", {"align": source}, root, strict=True, progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_strict_stops_at_the_first_bad_record_in_file_order(tmp_path: Path, root: Path, workers: int) -> None:
    # bad records in several chunks of image checks (distinct images: 128 a chunk), a structural one late
    for i in range(400):
        write_png(root / "many" / f"{i}.png", size=(4, 4), seed=i)
    records = [caption(f"r{i}", image=f"many/{i}.png") for i in range(400)]
    records[390] = CASES["gpt_first"][0]
    records[300] = caption("r300", image="missing-300.png")
    records[170] = caption("r170", image="missing-170.png")
    records[20] = caption("r20", image="sub/other.png")  # fine
    source = write_jsonl(tmp_path / "many.jsonl", records)
    with pytest.raises(DataError, match=r"record index 170, line 171 \(id r170\): image_missing"):
        prepare_llava(tmp_path / "out", {"align": source}, root, workers=workers, strict=True, progress=False)
    records[170] = caption("r170", image="many/170.png")
    write_jsonl(source, records)
    with pytest.raises(DataError, match=r"record index 300, line 301 \(id r300\): image_missing"):
        prepare_llava(tmp_path / "out", {"align": source}, root, workers=workers, strict=True, progress=False)
    write_jsonl(source, [*records[:250], "{oops", *records[250:]])  # a malformed line before the bad image
    with pytest.raises(DataError, match=r"record index 250, line 251: malformed_json"):
        prepare_llava(tmp_path / "out", {"align": source}, root, workers=workers, strict=True, progress=False)


def test_malformed_json_list_names_the_line(tmp_path: Path, root: Path) -> None:
    text = json.dumps([caption("a"), caption("b")], indent=2)
    broken = text.replace('"b"', '"b" "oops"', 1)
    source = tmp_path / "list.json"
    source.write_text(broken)
    line = broken[: broken.index('"oops"')].count("\n") + 1
    for strict in (False, True):
        with pytest.raises(DataError, match=rf"list.json: malformed JSON at line {line}, column"):
            prepare_llava(tmp_path / "out", {"align": source}, root, strict=strict, progress=False)
    assert not (tmp_path / "out").exists()


def test_json_list_steps_over_records_too_deep_or_too_large(tmp_path: Path, root: Path) -> None:
    deep = '{"id": "deep", "x": ' + "[" * 100_000 + '"]}"' + "]" * 100_000 + "}"  # a bracket in a string too
    large = json.dumps(caption("large", text="<image>\n" + "x" * llava.MAX_RECORD_CHARS))
    source = tmp_path / "list.json"
    source.write_text(f"[{json.dumps(caption('a'))},\n{deep},\n{large},\n{json.dumps(caption('b'))}]")
    manifest = prepare_llava(tmp_path / "out", {"align": source}, root, progress=False)
    assert manifest["splits"]["align"]["skipped"] == {"too_deep": 1, "too_large": 1}
    skipped = PreparedDataset(tmp_path / "out").skipped()
    assert [(s["index"], s["line"], s["reason"]) for s in skipped] == [(1, 2, "too_deep"), (2, 3, "too_large")]
    assert all(len(s["detail"]) < 200 for s in skipped)
    assert [r["id"] for r in PreparedDataset(tmp_path / "out").records("align")] == ["a", "b"]


def test_json_object_instead_of_list(tmp_path: Path, root: Path) -> None:
    source = tmp_path / "obj.json"
    source.write_text(json.dumps(caption("a"), indent=2))
    with pytest.raises(DataError, match="single JSON object"):
        prepare_llava(tmp_path / "out", {"align": source}, root, progress=False)


def test_json_list_line_numbers_point_at_records(tmp_path: Path, root: Path) -> None:
    records = [caption("a"), caption("b", image="nope.png"), caption("c")]
    source = tmp_path / "pretty.json"
    source.write_text(json.dumps(records, indent=2))
    prepare_llava(tmp_path / "out", {"align": source}, root, progress=False)
    (skip,) = PreparedDataset(tmp_path / "out").skipped()
    lines = source.read_text().splitlines()
    assert lines[skip["line"] - 1].strip() == "{"
    assert '"b"' in lines[skip["line"]]


def test_lcs558k_and_665k_styles(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_png(root / "00453" / "004539375.png", size=(20, 30))
    Image.new("RGB", (40, 30), "blue").save(root / "00453" / "004539376.jpg")
    write_png(root / "coco" / "train2017" / "000000033471.png", size=(16, 16))
    lcs = [
        {
            "id": "004539375",
            "image": "00453/004539375.png",
            "conversations": [
                {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
                {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"},
            ],
        },
        {
            "id": "004539376",
            "image": "00453/004539376.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nGive a brief description of the image."},
                {"from": "gpt", "value": "a blue square"},
            ],
        },
    ]
    mix = [
        {
            "id": "000000033471",
            "image": "coco/train2017/000000033471.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
                {"from": "gpt", "value": "The bus in the image is white and red."},
                {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                {"from": "gpt", "value": "The back of the bus features an advertisement."},
            ],
        },
        {
            "id": 12345,
            "model": "",
            "conversations": [
                {"from": "human", "value": "Write a haiku about data."},
                {"from": "gpt", "value": "Rows in parquet."},
            ],
        },
    ]
    align = tmp_path / "blip_laion_cc_sbu_558k.json"
    align.write_text(json.dumps(lcs))
    instruct = write_jsonl(tmp_path / "mix665k.jsonl", mix)
    out = tmp_path / "out"
    manifest = prepare_llava(out, {"align": align, "instruct": instruct}, root, progress=False)

    assert manifest["kind"] == "llava"
    assert manifest["format_version"] == 1
    assert manifest["image_root"] == str(root.resolve())
    assert manifest["splits"]["align"]["source"] == {
        "path": str(align.resolve()),
        "sha256": __import__("hashlib").sha256(align.read_bytes()).hexdigest(),
    }
    assert manifest["options"]["strict"] is False and manifest["options"]["workers"] == 1
    assert json.loads((out / "manifest.json").read_text()) == manifest

    table = pq.read_table(out / "instruct.parquet")
    assert str(table.schema.field("width").type) == "int32"
    rows = table.to_pylist()
    assert rows[0]["width"] == 16 and rows[0]["height"] == 16
    assert rows[0]["length"] == sum(len(t["value"].split()) for t in mix[0]["conversations"])
    assert rows[1] == {
        "id": "12345",
        "image": None,
        "conversations": json.dumps(mix[1]["conversations"]),
        "width": None,
        "height": None,
        "length": 8,
    }
    dataset = PreparedDataset(out)
    align_rows = dataset.records("align")
    assert [(r["width"], r["height"]) for r in align_rows] == [(20, 30), (40, 30)]
    assert dataset.load_image(align_rows[1]).size == (40, 30)
    assert dataset.records("instruct")[0]["conversations"] == mix[0]["conversations"]


def test_workers_give_the_same_result(tmp_path: Path, root: Path) -> None:
    records = [caption(f"r{i}", image="ok.png" if i % 3 else "sub/other.png") for i in range(300)]
    for i in range(0, 300, 50):
        records[i] = caption(f"r{i}", image=f"missing-{i}.png")
    source = write_jsonl(tmp_path / "many.jsonl", records)
    one = prepare_llava(tmp_path / "one", {"align": source}, root, workers=1, progress=False)
    two = prepare_llava(tmp_path / "two", {"align": source}, root, workers=2, progress=False)
    assert one["splits"] == two["splits"]
    assert one["splits"]["align"]["skipped"] == {"image_missing": 6}
    assert pq.read_table(tmp_path / "one" / "align.parquet").equals(pq.read_table(tmp_path / "two" / "align.parquet"))
    with pytest.raises(DataError, match=r"line 1 \(id r0\): image_missing"):
        prepare_llava(tmp_path / "three", {"align": source}, root, workers=2, strict=True, progress=False)


def test_existing_output_is_refused_or_replaced_atomically(tmp_path: Path, root: Path) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", [caption("a")])
    out = tmp_path / "out"
    prepare_llava(out, {"align": source}, root, progress=False)
    with pytest.raises(DsvlmError, match="already exists; pass --overwrite"):
        prepare_llava(out, {"align": source}, root, progress=False)

    write_jsonl(source, [caption("a"), caption("b")])
    prepare_llava(out, {"align": source}, root, overwrite=True, progress=False)
    assert PreparedDataset(out).manifest["splits"]["align"]["records"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "images", "out"]

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(DsvlmError, match="not a prepared dataset"):
        prepare_llava(precious, {"align": source}, root, overwrite=True, progress=False)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_interrupted_prepare_leaves_no_output(tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    align = write_jsonl(tmp_path / "a.jsonl", [caption("a")])
    instruct = write_jsonl(tmp_path / "i.jsonl", [caption("i")])
    real_write = llava._write_split
    calls = []

    def interrupted(path: Path, *args: object) -> None:
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(path, *args)

    monkeypatch.setattr(llava, "_write_split", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_llava(out, {"align": align, "instruct": instruct}, root, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "i.jsonl", "images"]

    monkeypatch.setattr(llava, "_write_split", real_write)
    prepare_llava(out, {"align": align}, root, progress=False)
    before = (out / "manifest.json").read_text()
    calls.clear()
    monkeypatch.setattr(llava, "_write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_llava(out, {"align": align, "instruct": instruct}, root, overwrite=True, progress=False)
    assert (out / "manifest.json").read_text() == before  # the old dataset is untouched


def test_bad_arguments(tmp_path: Path, root: Path) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", [caption("a")])
    with pytest.raises(DataError, match="is not a directory"):
        prepare_llava(tmp_path / "out", {"align": source}, tmp_path / "nope", progress=False)
    with pytest.raises(DataError, match="no such file"):
        prepare_llava(tmp_path / "out", {"align": tmp_path / "nope.json"}, root, progress=False)
    with pytest.raises(DataError, match="no input split"):
        prepare_llava(tmp_path / "out", {}, root, progress=False)
    with pytest.raises(DataError, match="inside OUT"):
        prepare_llava(tmp_path, {"align": source}, root, overwrite=True, progress=False)


def test_summary_table_lists_reasons(tmp_path: Path, root: Path) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", [caption("a"), caption("a"), caption("b", image="nope.png")])
    manifest = prepare_llava(tmp_path / "out", {"align": source}, root, progress=False)
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(summary_table(manifest))
    text = console.export_text()
    assert "duplicate_id 1" in text and "image_missing 1" in text


def test_every_skip_reason_has_a_case() -> None:
    assert {reason for _, reason in CASES.values()} == set(llava.REASONS)


def test_output_has_the_usual_permissions(tmp_path: Path, root: Path) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", [caption("a")])
    prepare_llava(tmp_path / "out", {"align": source}, root, progress=False)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_a_utf8_bom_is_read(tmp_path: Path, root: Path, layout: str) -> None:
    records = [caption("a"), caption("b")]
    text = json.dumps(records) if layout == "json" else "\n".join(json.dumps(r) for r in records)
    source = tmp_path / f"a.{layout}"
    source.write_bytes(b"\xef\xbb\xbf" + text.encode())
    manifest = prepare_llava(tmp_path / "out", {"align": source}, root, progress=False)
    assert manifest["splits"]["align"]["records"] == 2 and manifest["splits"]["align"]["skipped"] == {}
