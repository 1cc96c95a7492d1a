"""User errors at launch are one line and exit 2, before any model is built: batch layout, --init, architectures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, cli, prepare_small_synthetic, tiny_overrides, tiny_vlm
from test_model_fixtures import CLIP
from transformers import CLIPVisionConfig, CLIPVisionModel

from dsvlm.errors import DsvlmError, RecipeError
from dsvlm.recipe import load_recipe
from dsvlm.train.loop import TrainOptions, train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_small_synthetic(tmp_path_factory.mktemp("data") / "synthetic", n=16)


@pytest.mark.slow  # two launched processes: both must stop with the line, neither may wait for the other
def test_a_global_batch_the_launched_processes_cannot_split_is_one_line(data, tmp_path):
    """global 8 = 8 per device fits one process; two launched processes cannot make it."""
    args = [
        sys.executable,
        "-m",
        "dsvlm",
        "train",
        "tiny-synthetic",
        *tiny_overrides(data, tmp_path / "run"),
        "--stage",
        "align",
        "--no-progress",
    ]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29537",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            args,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(2)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr[-2000:]
        assert "not divisible by per_device_batch_size 8 x 2 processes" in stderr
        assert "Traceback" not in stderr
    assert not (tmp_path / "run" / "align").exists()


def test_a_missing_init_directory_is_one_line_and_creates_no_run(data, tmp_path):
    result = cli(
        "train",
        "tiny-synthetic",
        *tiny_overrides(data, tmp_path / "run"),
        "--stage",
        "instruct",
        "--init",
        tmp_path / "nowhere",
    )
    assert result.exit_code == 2 and "nowhere" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_an_init_of_another_architecture_is_a_clear_error(data, tmp_path):
    init = tmp_path / "other" / "align" / "final"
    (init / "vlm").mkdir(parents=True)
    (init / "stage.json").write_text(json.dumps({"stage": "align", "finished": "2024-01-01T00:00:00+00:00"}))
    (init / "vlm" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    recipe = load_recipe("tiny-synthetic", tiny_overrides(data, tmp_path / "run"))
    with pytest.raises(DsvlmError, match="'llama' model, not the LLaVA"):
        train(recipe, TrainOptions(stages=["instruct"], init=init, progress=False))


def test_a_pretrained_llm_of_another_architecture_or_missing_is_a_recipe_error(tmp_path):
    clip = tmp_path / "clip"
    CLIPVisionModel(CLIPVisionConfig(**CLIP)).save_pretrained(clip)
    for source in (clip, tmp_path / "missing"):
        recipe = load_recipe("tiny-synthetic", [f"model.llm.pretrained={source}", "model.llm.config=null"])
        with pytest.raises(RecipeError, match=r"model.llm.pretrained .* does not load"):
            tiny_vlm(recipe.model)
    recipe = load_recipe(
        "tiny-synthetic", [f"model.vision.pretrained={tmp_path / 'missing'}", "model.vision.config=null"]
    )
    with pytest.raises(RecipeError, match=r"model.vision.pretrained .* does not load"):
        tiny_vlm(recipe.model)


def test_deepspeed_with_gradient_accumulation_is_refused_before_any_model_loads(data, tmp_path, monkeypatch):
    """`accelerate launch` with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED in each process."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    overrides = [*tiny_overrides(data, tmp_path / "run", batch=8), "stages.0.per_device_batch_size=4"]
    recipe = load_recipe("tiny-synthetic", overrides)
    with pytest.raises(DsvlmError, match="under DeepSpeed dsvlm needs gradient accumulation 1"):
        train(recipe, TrainOptions(stages=["align"], progress=False))
    assert not (tmp_path / "run").exists()
