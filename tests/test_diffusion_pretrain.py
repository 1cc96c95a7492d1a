"""`dsvlm pretrain-diffusion`: a diffusers directory in SD's layout, resumable, reusable, frozen in the DS stages."""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from helpers import tiny_diffusion, tiny_model, tiny_overrides
from safetensors.torch import load_file
from typer.testing import CliRunner

from dsvlm.cli.app import app
from dsvlm.data.detect import detect_object
from dsvlm.data.synthetic import BACKGROUNDS, COLOURS, SHAPES, Scene, Shape, SyntheticConfig, prepare_synthetic, render
from dsvlm.diffusion import pretrain
from dsvlm.diffusion.pretrain import INFO, PretrainOptions, pretrain_diffusion
from dsvlm.errors import DsvlmError
from dsvlm.model.collate import Collator
from dsvlm.model.freeze import freeze_for_stage
from dsvlm.recipe import load_recipe

SMALL = PretrainOptions(steps=4, batch_size=4, checkpoint_every=2, eval_captions=4, sample_steps=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "data"
    return prepare_synthetic(out, SyntheticConfig(n_align=16, n_instruct=8, n_eval=2), progress=False) and out


def test_the_directory_loads_through_diffusers_like_stable_diffusion(data: Path, tmp_path: Path) -> None:
    out = pretrain_diffusion(data, tmp_path / "sd", SMALL, progress=False)
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (out / part).is_dir(), part
    assert not (out / "vae").exists() and not (out / "checkpoints").exists()
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert unet.config.cross_attention_dim == SMALL.text_width and unet.config.in_channels == 3
    assert DDPMScheduler.from_pretrained(out, subfolder="scheduler").config.beta_schedule == "scaled_linear"
    info = json.loads((out / INFO).read_text())
    assert set(info["learned"]) >= {"trained", "random_unet", "chance"}
    assert (out / "samples.png").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0


def test_latent_space_pipeline_generates_through_stable_diffusion_pipeline(data: Path, tmp_path: Path) -> None:
    options = PretrainOptions(steps=2, vae_steps=2, batch_size=4, eval_captions=2, sample_steps=2)
    out = pretrain_diffusion(data, tmp_path / "sd", options, progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the corpus, not SD's constant
    image = pipe(
        "a small red circle in the center.", num_inference_steps=2, height=32, width=32, output_type="np"
    ).images[0]
    assert image.shape == (32, 32, 3)


def test_a_finished_model_is_reused_and_other_contents_are_refused(data: Path, tmp_path: Path) -> None:
    out = pretrain_diffusion(data, tmp_path / "sd", SMALL, progress=False)
    stamp = (out / INFO).stat().st_mtime_ns
    result = CliRunner().invoke(
        app,
        [
            "pretrain-diffusion",
            str(data),
            "--out",
            str(out),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--checkpoint-every",
            "2",
            "--no-progress",
        ],
    )
    # The CLI's default eval_captions differ from SMALL's: a model of other options is refused, never replaced.
    assert result.exit_code == 2 and "--overwrite" in result.output and (out / INFO).stat().st_mtime_ns == stamp
    assert pretrain_diffusion(data, out, SMALL, progress=False) == out and (out / INFO).stat().st_mtime_ns == stamp
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for flags, reason in (
        ({}, "--overwrite"),
        ({"overwrite": True}, "not a pretrained diffusion model written"),
        ({"resume": True}, "--overwrite"),
    ):
        with pytest.raises(DsvlmError, match=reason):
            pretrain_diffusion(data, foreign, SMALL, progress=False, **flags)
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("vae_steps", [0, 2], ids=["pixel", "latent"])
def test_a_resumed_run_equals_the_uninterrupted_one(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vae_steps: int
) -> None:
    options = PretrainOptions(**{**SMALL.__dict__, "vae_steps": vae_steps})
    whole = pretrain_diffusion(data, tmp_path / "whole", options, progress=False)
    step = pretrain._train_step

    def interrupted(*args, **kwargs):
        if inspect.signature(step).bind(*args, **kwargs).arguments["step"] == 3:  # after the step-2 checkpoint
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(pretrain, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain_diffusion(data, tmp_path / "cut", options, progress=False)
    assert (tmp_path / "cut" / "checkpoints").is_dir() and not (tmp_path / "cut" / INFO).exists()
    monkeypatch.setattr(pretrain, "_train_step", step)
    resumed = pretrain_diffusion(data, tmp_path / "cut", options, resume=True, progress=False)
    a = load_file(str(whole / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    if vae_steps:  # the measured latent scale is config, not weights: a run resumed past the VAE phase needs it too
        scale = [json.loads((d / "vae" / "config.json").read_text())["scaling_factor"] for d in (whole, resumed)]
        assert scale[0] == scale[1] != 0.18215


def test_the_detector_reads_every_rendered_colour_shape_and_size() -> None:
    rng = random.Random(0)
    for colour in COLOURS:
        for shape in SHAPES:
            for size in ("small", "large"):
                for background in BACKGROUNDS:
                    scene = Scene(
                        background, (Shape(colour, shape, size, rng.choice(["left", "center", "top"]), 0.0, 0.0),)
                    )
                    assert detect_object(np.asarray(render(scene, 32))) == (colour, shape), scene
    assert detect_object(np.zeros((32, 32, 3), dtype=np.uint8)) == (None, None)


def test_the_pretrained_unet_stays_bit_identical_in_a_ds_stage(tmp_path: Path, data: Path) -> None:
    recipe = load_recipe("tiny-synthetic", tiny_overrides(data, tmp_path / "run"))
    assert recipe.supervision.freeze_unet and recipe.supervision.diffusion.pretrained == str(tiny_diffusion())
    model = tiny_model(recipe)
    freeze_for_stage(model, recipe.stages[0].train)
    branch = model.supervision
    pretrained = UNet2DConditionModel.from_pretrained(tiny_diffusion(), subfolder="unet").state_dict()
    assert all(torch.equal(pretrained[k], v) for k, v in branch.unet.state_dict().items() if k in pretrained)
    adapters = {k: v.clone() for k, v in branch.adapters.state_dict().items()}
    examples = [
        {
            "index": i,
            "id": str(i),
            "latent": None,
            "image": render(Scene("white", (Shape("red", "circle", "large", "center", 0.0, 0.0),)), 32),
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                {"from": "gpt", "value": "red"},
            ],
        }
        for i in range(4)
    ]
    batch = Collator(model.processor, "chat", max_length=64, rec_resolution=32)(examples)
    batch["noise_seeds"] = batch["sample_index"] + 7
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    after = branch.unet.state_dict()
    assert all(torch.equal(pretrained[k], after[k]) for k in pretrained)
    assert any(not torch.equal(adapters[k], v) for k, v in branch.adapters.state_dict().items())
    assert not any(k.startswith("unet.") and ".processor." not in k for k in branch.trainable_state_dict())
