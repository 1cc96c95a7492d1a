"""Frozen VLM weights from a 16-bit checkpoint are held in 16 bits under a bf16 stage: the same loss and gradients,
and the stage output keeps their exact fp32 values."""

from __future__ import annotations

import copy
import shutil

import torch
from helpers import tiny_model, tiny_overrides
from safetensors.torch import load_file, save_file
from test_model_dsvlm import batch_for
from test_model_fixtures import tiny_recipe
from torch import nn

from dsvlm.model.dsvlm import save_model
from dsvlm.model.freeze import freeze_for_stage
from dsvlm.model.precision import frozen_lower_precision_layers, hold_frozen_vlm_weights
from dsvlm.recipe import load_recipe
from dsvlm.train.loop import TrainOptions, train


def fp16_checkpoint_model():
    """The tiny model with its LLM's Linear weights rounded to fp16 values, as Vicuna's fp16 checkpoint loads into
    fp32 master weights, frozen as in stage 1 (only the connector trains)."""
    model = tiny_model(tiny_recipe())
    with torch.no_grad():
        for module in model.vlm.model.language_model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(module.weight.half().float())
    freeze_for_stage(model, ["connector"])
    return model


def test_lossless_16_bit_weights_give_the_same_loss_and_gradients_under_autocast():
    full = fp16_checkpoint_model()
    held = copy.deepcopy(full)
    cast = hold_frozen_vlm_weights(held.vlm, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in held.vlm.named_parameters()}
    q_proj = next(n for n in dtypes if n.endswith("layers.0.self_attn.q_proj.weight") and "language_model" in n)
    assert dtypes[q_proj] == torch.float16  # exact in fp16, not in bf16
    assert cast == sum(p.numel() for p in held.vlm.parameters() if p.dtype in (torch.float16, torch.bfloat16)) > 0
    # random fp32 weights (the encoder here), the trainable connector and non-Linear layers stay fp32
    assert all(dtypes[n] == torch.float32 for n in dtypes if "vision_tower" in n or "projector" in n)
    assert all(dtypes[n] == torch.float32 for n in dtypes if "norm" in n or "embed_tokens" in n)
    batch = batch_for(full, n=2)
    losses = []
    for model in (full, held):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch, supervise=False)
        out.loss.backward()
        losses.append(out.loss)
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(full.named_parameters(), held.parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a.grad, b.grad), name


def test_the_stage_output_keeps_the_exact_fp32_values(tmp_path):
    model = fp16_checkpoint_model()
    original = {k: v.clone() for k, v in model.vlm.state_dict().items()}
    assert hold_frozen_vlm_weights(model.vlm, torch.bfloat16) > 0
    save_model(model, tmp_path)
    saved = saved_vlm(tmp_path / "vlm")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert model.vlm.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.float16
    before, after = llm_projections(original), llm_projections(saved)
    assert before and before.keys() == after.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_random_or_tied_weights_are_not_held():
    model = tiny_model(tiny_recipe())  # random fp32 init: no 16-bit type holds it exactly
    freeze_for_stage(model, ["connector"])
    assert hold_frozen_vlm_weights(model.vlm, torch.bfloat16) == 0
    tied = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8, bias=False))
    tied[1].weight = tied[0].weight  # an LM head tied to the token embeddings
    tied.requires_grad_(False)
    assert list(frozen_lower_precision_layers(tied, (nn.Linear,))) == []


def saved_vlm(directory):
    state = {}
    for file in directory.glob("*.safetensors"):
        state.update(load_file(file))
    return state


def llm_projections(state):
    """The LLM's Linear weights by their name from "layers." on: saved in LLaVA's classic layout
    (language_model.model.layers...), in memory as model.language_model.layers..."""
    return {k[k.index("layers.") :]: v for k, v in state.items() if "language_model" in k and "proj.weight" in k}


def test_a_bf16_stage_from_a_16_bit_init_holds_it_saves_it_exactly_and_resumes(tiny_run, tmp_path, caplog):
    init = tiny_run.copy(tmp_path / "init")
    for file in (init.final / "vlm").glob("*.safetensors"):  # the LLM as an fp16 checkpoint would give it
        state = load_file(file)
        rounded = {
            k: v.half().float() if k.endswith("proj.weight") and "language_model" in k else v for k, v in state.items()
        }
        save_file(rounded, file, metadata={"format": "pt"})
    frozen = llm_projections(saved_vlm(init.final / "vlm"))
    out = tmp_path / "run"
    overrides = tiny_overrides(
        init.data,
        out,
        steps=2,
        **{
            "stages.0.precision": "bf16",
            "stages.0.train": "[connector,supervision]",  # the paper's stage 1: the LLM frozen
            "run.checkpoint_every": 1,
        },
    )
    recipe = load_recipe("tiny-synthetic", overrides)
    with caplog.at_level("INFO", logger="dsvlm.train.loop"):
        train(recipe, TrainOptions(stages=["align"], init=init.root, progress=False))
    assert "frozen VLM weights held in 16 bits" in caplog.text
    final = saved_vlm(out / "align" / "final" / "vlm")
    assert {t.dtype for t in final.values()} == {torch.float32}
    after = llm_projections(final)
    assert after.keys() == frozen.keys() and all(torch.equal(after[k], frozen[k]) for k in frozen)

    # resume from the step-1 checkpoint, whose frozen LLM weights were saved in 16 bits: same result
    shutil.rmtree(out / "align" / "final")
    train(recipe, TrainOptions(stages=["align"], init=init.root, resume=True, progress=False))
    resumed = saved_vlm(out / "align" / "final" / "vlm")
    assert resumed.keys() == final.keys()
    assert all(torch.equal(resumed[k], final[k]) for k in final)
