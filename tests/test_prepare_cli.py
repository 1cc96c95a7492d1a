"""`dsvlm prepare`: stdout carries only the path (or JSON), errors exit 2 without a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsvlm.cli import prepare as prepare_cli
from dsvlm.cli.app import app
from dsvlm.data.latents import LatentCache
from dsvlm.data.prepared import PreparedDataset
from dsvlm.data.synthetic import QUESTION_TYPES
from dsvlm.model.supervision.vae import vae_fingerprint
from dsvlm.model.vlm import image_geometry
from dsvlm.recipe import load_recipe

TINY_GEOMETRY = image_geometry(load_recipe("tiny-synthetic").model)
SMALL = ["--n-align", "8", "--n-instruct", "12", "--n-eval", "4"]


def run(*args: str):
    return CliRunner().invoke(app, ["prepare", *args])


def assert_user_error(result, message: str) -> None:
    """What a user sees for an expected error: exit 2 and the message on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def tiny_vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
    )


def test_synthetic_prints_only_the_path(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    result = run(
        "synthetic",
        str(out),
        *SMALL,
        "--seed",
        "1",
        "--question-types",
        "colour, shape",
        "--max-objects",
        "3",
        "--image-size",
        "24",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"
    assert "align" in result.stderr and "instruct" in result.stderr  # the summary table
    options = PreparedDataset(out).manifest["options"]
    assert options["question_types"] == ["colour", "shape"]
    assert (options["seed"], options["max_objects"], options["image_size"]) == (1, 3, 24)


def test_json_summary(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    result = run("synthetic", str(out), *SMALL, "--json", "--option-order", "shuffled")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["path"] == str(out)
    assert summary["splits"]["instruct"]["records"] == 12
    assert summary["options"]["option_order"] == "shuffled"
    assert summary["options"]["question_types"] == list(QUESTION_TYPES)  # the CLI default is the library's
    assert summary["eval"] == {"synthetic": "eval/synthetic.parquet"}


def test_llava_skips_and_reports(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    lines = [{"id": str(i), "image": image, "conversations": turns} for i, image in enumerate(["a.png", "b.png"])]
    source = tmp_path / "data.jsonl"
    source.write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "out"
    result = run("llava", str(out), "--instruct", str(source), "--image-root", str(tmp_path / "img"), "--workers", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"
    assert "1 record(s) skipped" in result.stderr and "image_missing 1" in result.stderr

    again = run("llava", str(out), "--instruct", str(source), "--image-root", str(tmp_path / "img"))
    assert_user_error(again, "--overwrite")
    none = run("llava", str(out), "--image-root", str(tmp_path / "img"))
    assert_user_error(none, "--align FILE")


def test_an_input_that_keeps_no_record_is_an_error_unless_allowed(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "g", "image": "a.png", "conversations": turns}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n" + json.dumps({"id": "0", "image": "gone.png", "conversations": turns}) + "\n{oops\n")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out, report = tmp_path / "out", tmp_path / "out.skipped.jsonl"
    images = ["--image-root", str(tmp_path / "img")]

    result = run("llava", str(out), "--align", str(good), "--instruct", str(bad), *images)
    assert_user_error(result, "--instruct: all 2 records were skipped (image_missing 1, malformed_json 1)")
    assert "--allow-empty" in result.stderr and str(report) in result.stderr
    assert not out.exists()
    skips = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(s["index"], s["line"], s["reason"]) for s in skips] == [(0, 2, "image_missing"), (1, 3, "malformed_json")]

    assert_user_error(run("llava", str(out), "--align", str(empty), *images), f"--align {empty} holds no record")
    report.write_text("my notes\n")  # a file of the user's under the report's name is not written over
    result = run("llava", str(out), "--instruct", str(bad), *images)
    assert_user_error(result, "is not a skipped report")
    assert report.read_text() == "my notes\n"

    allowed = run("llava", str(out), "--align", str(empty), "--instruct", str(bad), *images, "--allow-empty")
    assert allowed.exit_code == 0, allowed.output
    dataset = PreparedDataset(out)
    assert [dataset.manifest["splits"][s]["records"] for s in ("align", "instruct")] == [0, 0]
    assert len(dataset.skipped()) == 2


def test_strict_exits_2_without_traceback(tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"id": "x", "conversations": []}\n')
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["prepare", "llava", str(out), "--align", str(source), "--image-root", str(tmp_path), "--strict"],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "error:" in result.stderr and "line 1 (id x): empty_conversations" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_latents_with_a_vae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def load_vae(recipe):
        seen.append(recipe)
        return tiny_vae()

    monkeypatch.setattr(prepare_cli, "_load_vae", load_vae)
    out = tmp_path / "syn"
    result = run("synthetic", str(out), "supervision.resolution=16", *SMALL, "--latents", "tiny-synthetic")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"
    assert seen[0].supervision.resolution == 16
    cache = LatentCache.open(out, vae_fingerprint(tiny_vae()), 16, TINY_GEOMETRY)
    image = PreparedDataset(out).records("align")[0]["image"]
    assert cache.get_image(image).shape == (4, 16, 16)
    assert "latent cache:" in result.stderr

    rebuilt = run("latents", str(out), "tiny-synthetic", "supervision.resolution=32", "--batch-size", "5")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert rebuilt.stdout == f"{out}\n"
    rebuilt_cache = LatentCache.open(out, vae_fingerprint(tiny_vae()), 32, TINY_GEOMETRY)
    assert rebuilt_cache.get_image(image).shape == (4, 32, 32)


def test_latents_not_needed_for_pixel_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare_cli, "_load_vae", lambda recipe: None)
    out = tmp_path / "syn"
    result = run("synthetic", str(out), *SMALL, "--latents", "tiny-synthetic")
    assert result.exit_code == 0, result.output
    assert "no latent cache needed" in result.stderr
    assert not (out / "latents").exists() and "latents" not in PreparedDataset(out).manifest


def test_llava_inputs_are_checked_before_the_vae_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --latents may load a VAE from the hub (minutes): a mistyped input file must fail before that
    loaded = []
    monkeypatch.setattr(prepare_cli, "_load_vae", lambda recipe: loaded.append(recipe) or tiny_vae())
    (tmp_path / "images").mkdir()
    args = ["--align", str(tmp_path / "typo.json"), "--image-root", str(tmp_path / "images")]
    result = run("llava", str(tmp_path / "out"), *args, "--latents", "tiny-synthetic")
    assert_user_error(result, "typo.json: no such file")
    assert not loaded and not (tmp_path / "out").exists()


def test_bad_invocations(tmp_path: Path) -> None:
    result = run("synthetic", str(tmp_path / "a"), "supervision.resolution=16", *SMALL)
    assert_user_error(result, "without --latents")
    result = run("synthetic", str(tmp_path / "b"), *SMALL, "--question-types", "colour,smell")
    assert_user_error(result, "unknown question type(s) smell")
    result = run("synthetic", str(tmp_path / "c"), *SMALL, "--option-order", "random")
    assert result.exit_code == 2 and "random" in result.stderr  # a usage error from click
    result = run("latents", str(tmp_path / "missing"), "tiny-synthetic")
    assert_user_error(result, "dsvlm prepare synthetic")
    result = run("hub", "liuhaotian/LLaVA-Pretrain", str(tmp_path / "d"))
    assert_user_error(result, "hf download")
    assert not any((tmp_path / name).exists() for name in "abcd")
