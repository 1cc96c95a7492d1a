"""Every ablation of the paper is one recipe switch: each case of docs/method.md's ablation table validates
against tiny-synthetic and trains one step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import REPO, prepare_small_synthetic, tiny_overrides

from dsvlm.recipe import load_recipe
from dsvlm.train.loop import TrainOptions, train

SECTION = "## Ablations of the paper as recipe switches"


def ablation_cases() -> list[tuple[str, list[str]]]:
    """(row label, overrides) for every case of the table: cells split on " / ", overrides in backticks."""
    text = (REPO / "docs" / "method.md").read_text()
    table = text[text.index(SECTION) :].split("\n## ", 1)[0]
    cases = []
    for row in table.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("paper ablation", "---"):
            continue
        for case in cells[1].split(" / "):
            overrides = re.findall(r"`([^`]+)`", case)
            if overrides:
                cases.append((cells[0], overrides))
    return cases


CASES = ablation_cases()


def test_the_table_covers_the_paper_ablations():
    overrides = {o for _, case in CASES for o in case}
    for expected in (
        "supervision.adapter=qformer",
        "supervision.cross_attention=shared",
        "supervision.cross_attention=shared_matched",
        "supervision.loss={mae: 1}",
        "supervision.loss={ssim: 1}",
        "supervision.loss={perceptual: 1}",
        "supervision.enabled=false",
        "supervision.vision_layers=[]",
        "supervision.connector=false",
    ):
        assert expected in overrides
    assert any(o.startswith("stages.1.train=") and "vision" not in o for o in overrides)  # frozen encoder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_small_synthetic(tmp_path_factory.mktemp("data") / "synthetic", n=8)


@pytest.mark.parametrize(("label", "overrides"), CASES, ids=[" + ".join(o) for _, o in CASES])
def test_each_ablation_validates_and_trains_a_step(data, tmp_path, label, overrides):
    base = load_recipe("tiny-synthetic")
    if base.supervision.diffusion.pixel_space and any("perceptual" in o for o in overrides):
        pytest.skip("tiny-synthetic diffuses in pixel space: the perceptual loss needs VAE features")
    out = tmp_path / "run"
    recipe = load_recipe("tiny-synthetic", tiny_overrides(data, out, steps=1, batch=4) + overrides)
    default = load_recipe("tiny-synthetic", tiny_overrides(data, out, steps=1, batch=4))
    # A case that is the recipe's own setting (tiny-synthetic's loss is MAE) changes nothing; any other must.
    assert recipe != default or overrides == ["supervision.loss={mae: 1}"], label
    # Run the stage the switch is about (stage 2 for stage-2 switches), one step.
    stage = "instruct" if any(o.startswith("stages.1.") for o in overrides) else "align"
    train(recipe, TrainOptions(stages=[stage], progress=False))
    [line] = [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()]
    supervised = recipe.supervision.enabled and recipe.stage(stage).supervision
    buckets = [v for k, v in line.items() if k.startswith("rec_loss_t")]
    if supervised:
        # The per-bucket means bracket the step's mean reconstruction loss.
        assert buckets and min(buckets) - 1e-6 <= line["rec_loss"] <= max(buckets) + 1e-6
    else:
        assert line["rec_loss"] is None and not buckets
    assert (out / stage / "final" / "stage.json").is_file()
