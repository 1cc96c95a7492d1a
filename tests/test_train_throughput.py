"""Metric lines carry tokens/s per device, the step's model TFLOPs (encoder + LLM) and the branch's apart, and
MFU when the device's peak is known (docs/method.md's formula, recomputed here from the model's parameters)."""

from __future__ import annotations

import json

import pytest
from helpers import prepare_small_synthetic, tiny_model, tiny_overrides

from dsvlm.recipe import load_recipe
from dsvlm.train.loop import TrainOptions, train


def test_metric_lines_carry_per_device_tokens_and_an_mfu_from_the_documented_formula(tmp_path):
    data = prepare_small_synthetic(tmp_path / "data", n=16)
    out = tmp_path / "run"
    overrides = tiny_overrides(data, out, steps=2, **{"run.peak_tflops": 1.0, "run.checkpoint_every": 100})
    recipe = load_recipe("tiny-synthetic", overrides)
    train(recipe, TrainOptions(stages=["align"], progress=False))
    lines = [json.loads(line) for line in (out / "align" / "metrics.jsonl").read_text().splitlines()]

    model = tiny_model(recipe)
    vlm = model.vlm
    llm = sum(p.numel() for p in [*vlm.model.language_model.parameters(), *vlm.lm_head.parameters()])
    tower = vlm.model.vision_tower
    # The branch reads the last of the 4 encoder layers, the connector the one before: all but the pooling tail.
    assert recipe.supervision.vision_layers[-1] == len(tower.encoder.layers) == 4
    vision = sum(p.numel() for name, p in tower.named_parameters() if not name.startswith("post_layernorm"))
    positions = (tower.config.image_size // tower.config.patch_size) ** 2 + 1  # CLIP's patches + CLS
    for line in lines:
        assert line["tokens_per_s_per_device"] == line["tokens_per_s"]  # one process
        tokens = line["tokens_per_s"] * line["step_time_s"]
        images = recipe.stages[0].global_batch_size  # every align record has an image
        # align trains encoder and LLM: 6 FLOPs per parameter per token for both.
        expected = 6 * llm * tokens + 6 * vision * positions * images
        assert line["model_tflops"] * 1e12 == pytest.approx(expected, rel=2e-3)
        assert 0 < line["mfu"] < 1
        assert line["mfu"] == pytest.approx(line["model_tflops"] / line["step_time_s"] / 1.0, rel=2e-3)
        assert line["branch_tflops"] > 0


def test_the_llm_term_counts_what_each_stage_really_computes():
    from test_model_fixtures import tiny_recipe

    from dsvlm.model.freeze import freeze_for_stage
    from dsvlm.recipe.schema import LLMLoraConfig
    from dsvlm.train.throughput import ModelFlops

    def llm_params(model):
        vlm = model.vlm
        params = {id(p): p for p in [*vlm.model.language_model.parameters(), *vlm.lm_head.parameters()]}.values()
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    lora = tiny_model(tiny_recipe(), llm_lora=LLMLoraConfig(rank=4, alpha=8))
    freeze_for_stage(lora, ["connector", "llm"])
    total, adapters = llm_params(lora)
    assert 0 < adapters < total
    # frozen base weights: forward and activation gradients only; weight gradients for the adapters alone
    assert ModelFlops.of(lora).llm_per_token == 4 * total + 2 * adapters

    only_branch = tiny_model(tiny_recipe())
    freeze_for_stage(only_branch, ["supervision"])
    total, _ = llm_params(only_branch)
    assert ModelFlops.of(only_branch).llm_per_token == 2 * total  # no gradient reaches the LLM
