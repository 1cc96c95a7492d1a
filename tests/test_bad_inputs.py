"""Every expected error is one clean message and exit 2: a table of bad inputs run through each command in
process, as a careless or hostile user would give them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import tiny_vlm
from typer.testing import CliRunner

from dsvlm.cli.app import app
from dsvlm.recipe import load_recipe
from dsvlm.recipe.load import recipe_path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A tiny prepared dataset, a few bad files, and a file to stand where a directory should be."""
    root = tmp_path_factory.mktemp("bad")
    prepared = CliRunner().invoke(
        app, ["prepare", "synthetic", str(root / "data"), "--n-align", "8", "--n-instruct", "8", "--n-eval", "4"]
    )
    assert prepared.exit_code == 0, prepared.output
    (root / "a-file").write_text("not a directory")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "broken.yaml").write_text("model: [\n")
    (root / "records.jsonl").write_text('{"id": "1", "conversations": []}\n')
    (root / "empty.jsonl").write_text("\n")
    (root / "images").mkdir()
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("precious")
    (root / "summary.json").write_text("{not json")
    laughs = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]  # "billion laughs": 9^9 values once expanded
    laughs += [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
    (root / "laughs.yaml").write_text("\n".join(laughs).replace("i: &i", "stages: &i") + "\n")
    (root / "self-alias.yaml").write_text("stages: &s [*s]\n")
    (root / "deep.yaml").write_text("stages: " + "[" * 10_000 + "]" * 10_000 + "\n")
    turns = '[{"from": "human", "value": "<image>\\nq"}, {"from": "gpt", "value": "a"}]'
    (root / "nul.jsonl").write_text(f'{{"id": "1", "image": "a\\u0000.png", "conversations": {turns}}}\n')
    broken = root / "broken-stage"  # a stage output whose weights were cut short
    broken.mkdir()
    (broken / "stage.json").write_text('{"stage": "align"}')
    (broken / "recipe.yaml").write_text(recipe_path("tiny-synthetic").read_text())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    hacked = root / "hacked-data"  # a prepared dataset whose manifest was edited to name a file outside it
    shutil.copytree(root / "data", hacked)
    manifest = json.loads((hacked / "manifest.json").read_text())
    manifest["splits"]["align"]["file"] = "../../../etc/passwd"
    (hacked / "manifest.json").write_text(json.dumps(manifest))
    foreign = root / "foreign-data"  # another tool's manifest.json
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"format_version": 1, "files": ["a.bin"]}')
    model = root / "broken-model"  # a LLaVA model directory whose weights were cut short
    vlm, processor = tiny_vlm(load_recipe("tiny-synthetic").model, seed=0)
    vlm.save_pretrained(model)
    processor.save_pretrained(model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return root


TRAIN = ["train", "tiny-synthetic", "data.dataset={data}", "run.output_dir={root}/run"]
CASES = {
    "recipe": [
        ["recipe", "validate", "{root}/nope.yaml"],
        ["recipe", "validate", "{root}/list.yaml"],
        ["recipe", "validate", "{root}/broken.yaml"],
        ["recipe", "validate", "tiny-synthetc"],
        ["recipe", "validate", "{root}/laughs.yaml"],
        ["recipe", "validate", "{root}/self-alias.yaml"],
        ["recipe", "validate", "{root}/deep.yaml"],
        ["recipe", "validate", "x" * 5000],
        ["recipe", "validate", "tiny-synthetic", "stages=" + "[" * 10_000 + "]" * 10_000],
        ["recipe", "validate", "tiny-synthetic", "run.seed"],
        ["recipe", "validate", "tiny-synthetic", "run.sede=1"],
        ["recipe", "validate", "tiny-synthetic", "run.seed.deeper=1"],
        ["recipe", "validate", "tiny-synthetic", "stages.9.lr=1"],
        ["recipe", "validate", "tiny-synthetic", "stages.0.lr=.nan"],
        ["recipe", "show", "no-such-recipe"],
        ["recipe", "cp", "tiny-synthetic", "{root}/data/manifest.json"],
        ["recipe", "cp", "tiny-synthetic", "{root}/a-file/recipe.yaml"],
    ],
    "prepare": [
        ["prepare", "synthetic", "{root}/a-file"],
        ["prepare", "synthetic", "{root}/mine", "--overwrite"],
        ["prepare", "synthetic", "{root}/x", "--question-types", "smell"],
        ["prepare", "synthetic", "{root}/a-file/x"],
        ["prepare", "llava", "{root}/x", "--align", "{root}/nope.json", "--image-root", "{root}/images"],
        ["prepare", "llava", "{root}/x", "--align", "{root}/records.jsonl", "--image-root", "{root}/nope"],
        ["prepare", "llava", "{root}/x", "--image-root", "{root}/images"],
        [
            "prepare",
            "llava",
            "{root}/x",
            "--align",
            "{root}/records.jsonl",
            "--image-root",
            "{root}/images",
            "--strict",
        ],
        ["prepare", "llava", "{root}/x", "--align", "{root}/nul.jsonl", "--image-root", "{root}/images", "--strict"],
        ["prepare", "llava", "{root}/x", "--align", "{root}/records.jsonl", "--image-root", "{root}/images"],
        ["prepare", "llava", "{root}/x", "--align", "{root}/empty.jsonl", "--image-root", "{root}/images"],
        ["prepare", "latents", "{root}/nope", "tiny-synthetic"],
        ["prepare", "latents", "{root}/hacked-data", "tiny-synthetic"],
        ["prepare", "latents", "{root}/foreign-data", "tiny-synthetic"],
        ["prepare", "hub", "liuhaotian/LLaVA-Pretrain", "{root}/x"],
    ],
    "train": [
        ["train", "tiny-synthetic", "data.dataset={root}/nope", "run.output_dir={root}/run"],
        [*TRAIN, "--stage", "pretrain"],
        [*TRAIN, "stages.0.lr=fast"],
        ["train", "tiny-synthetic", "data.dataset={data}", "run.output_dir={root}/mine", "--overwrite"],
        ["train", "tiny-synthetic", "data.dataset={data}", "run.output_dir={root}/mine", "--resume"],
        ["train", "tiny-synthetic", "data.dataset={data}", "run.output_dir={root}/mine"],
        ["train", "tiny-synthetic", "data.dataset={data}", "run.output_dir={root}/a-file/run"],
        [*TRAIN, "--init", "{root}/mine"],
        [*TRAIN, "stages.0.split=nope"],
        ["train", "tiny-synthetic", "data.dataset={root}/hacked-data", "run.output_dir={root}/run"],
        ["train", "tiny-synthetic", "data.dataset={root}/foreign-data", "run.output_dir={root}/run"],
        [
            "train",
            "tiny-synthetic",
            "data.dataset={data}",
            "run.output_dir={root}/run2",
            "--init",
            "{root}/broken-stage",
            "--stage",
            "instruct",
        ],
    ],
    "strip": [
        ["strip", "{root}/mine", "--out", "{root}/out"],
        ["strip", "{root}/nope", "--out", "{root}/out"],
        ["strip", "{root}/data", "--out", "{root}/out"],
        ["strip", "{root}/broken-stage", "--out", "{root}/out"],
    ],
    "eval": [
        ["eval", "{root}/mine", "--bench", "synthetic"],
        ["eval", "{root}/mine", "--bench", "nosuchbench"],
        ["eval", "{root}/mine", "--bench", "synthetic", "--data-files", "nonsense"],
        ["eval", "{root}/mine", "--bench", "synthetic", "--compare", "{root}/summary.json"],
        ["eval", "{root}/mine", "--bench", "synthetic", "--compare", "{root}/nope.json"],
        ["eval", "{root}/broken-stage", "--bench", "synthetic", "--data-files", "synthetic={data}"],
        ["eval", "{root}/broken-model", "--bench", "synthetic", "--data-files", "synthetic={data}"],
        ["eval", "{root}/broken-model", "--bench", "synthetic", "--data-files", "synthetic={data}", "--device", "cuda"],
    ],
}


@pytest.mark.parametrize(
    "args",
    [pytest.param(args, id=f"{command}-{i}") for command, table in CASES.items() for i, args in enumerate(table)],
)
def test_a_bad_input_is_one_clean_error_with_exit_2(files, args):
    before = sorted(p.relative_to(files) for p in files.rglob("*"))
    result = CliRunner().invoke(app, [a.format(root=files, data=files / "data") for a in args])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output  # not an uncaught error
    assert result.stderr.count("error:") + result.stderr.count("Error") == 1, result.stderr
    assert set(before) <= {p.relative_to(files) for p in files.rglob("*")}  # nothing of the user's deleted


@pytest.mark.parametrize(
    "args",
    [
        ["recipe", "validate", "tiny-synthetic", "run.seed=" + "x" * 100_000],
        ["recipe", "validate", "tiny-synthetic", "run." + "x" * 100_000 + "=1"],
        ["recipe", "validate", "y" * 100_000],
        [
            "prepare",
            "llava",
            "{root}/x",
            "--align",
            "{root}/huge-id.jsonl",
            "--image-root",
            "{root}/images",
            "--strict",
        ],
    ],
)
def test_an_error_quotes_user_values_briefly(files, args):
    (files / "huge-id.jsonl").write_text(json.dumps({"id": ["x" * 1000] * 1000, "conversations": []}) + "\n")
    result = CliRunner().invoke(app, [a.format(root=files) for a in args])
    assert result.exit_code == 2, result.output[:2000]
    assert len(result.stderr) < 1000, result.stderr[:2000]


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_cut_short_after_prepare_stops_training_naming_it(tmp_path, workers):
    from helpers import tiny_overrides

    from dsvlm.data.synthetic import SyntheticConfig, prepare_synthetic

    data = tmp_path / "data"
    prepare_synthetic(data, SyntheticConfig(n_align=8, n_instruct=8, n_eval=2), progress=False)
    for image in (data / "images").rglob("*.png"):
        image.write_bytes(image.read_bytes()[:60])
    overrides = tiny_overrides(data, tmp_path / "run", steps=1, **{"data.num_workers": workers})
    result = CliRunner().invoke(app, ["train", "tiny-synthetic", *overrides, "--stage", "align", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stderr.count("error:") == 1, result.stderr
    assert f"{data.resolve() / 'images'}" in result.stderr and "cannot be read" in result.stderr
