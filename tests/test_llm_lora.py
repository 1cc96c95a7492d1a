"""LoRA on the LLM (a stage's `llm_lora`): only the adapters train, the stage output keeps them beside the base
weights as a peft adapter, resume restores them, and strip merges them into a plain LLaVA."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import prepare_small_synthetic, tiny_model, tiny_overrides
from peft import PeftModel
from safetensors import safe_open
from test_model_dsvlm import VLM_INPUTS, batch_for
from test_model_fixtures import recipe_dict, tiny_recipe
from transformers import LlavaForConditionalGeneration

from dsvlm.errors import RecipeError
from dsvlm.model.dsvlm import DSVLM, load_vlm, save_model
from dsvlm.model.freeze import freeze_for_stage
from dsvlm.model.lora import has_llm_lora, lora_parameters
from dsvlm.recipe import load_recipe
from dsvlm.recipe.load import validate_recipe
from dsvlm.recipe.schema import LLMLoraConfig, StageConfig
from dsvlm.strip.strip import LLAVA_PREFIXES, load_trained, probe_batch, strip
from dsvlm.train.loop import TrainOptions, _param_groups, train

LORA = LLMLoraConfig(rank=4, alpha=8, dropout=0.0)


def logits(model: DSVLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.vlm.eval()(**{k: batch[k] for k in VLM_INPUTS}).logits


def trained_lora_model() -> tuple[DSVLM, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LoRA'd tiny DS-VLM after one optimizer step of stage-2 freezing; its batch; its base weights before."""
    model = tiny_model(tiny_recipe(), llm_lora=LORA)
    freeze_for_stage(model, ["connector", "llm"])
    batch = batch_for(model)
    before = {n: p.detach().clone() for n, p in model.vlm.named_parameters() if "lora_" not in n}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(batch, supervise=False).loss.backward()
    optimizer.step()
    return model, batch, before


def test_llm_lora_starts_as_the_base_model_and_trains_only_its_adapters() -> None:
    plain, model = tiny_model(tiny_recipe()), tiny_model(tiny_recipe(), llm_lora=LORA)
    batch = batch_for(model)
    torch.testing.assert_close(logits(model, batch), logits(plain, batch), rtol=0, atol=0)  # B = 0

    freeze_for_stage(model, ["connector", "llm"])
    trainable = {n for n, p in model.vlm.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    layers = len(model.vlm.model.language_model.layers)
    assert len(lora) == layers * 7 * 2  # q/k/v/o/gate/up/down, A and B each
    assert all(n.startswith("model.language_model.layers.") for n in lora)  # not the vision tower's q/k/v_proj
    assert trainable - lora == {n for n in trainable if n.startswith("model.multi_modal_projector.")}

    model, batch, before = trained_lora_model()
    after = dict(model.vlm.named_parameters())
    assert all(
        torch.equal(value, after[name])
        for name, value in before.items()
        if not name.startswith("model.multi_modal_projector.")
    )  # the LLM's base weights did not move
    assert not torch.allclose(logits(model, batch), logits(plain, batch), atol=1e-4)


def test_the_adapters_take_their_own_learning_rate() -> None:
    model = tiny_model(tiny_recipe(), llm_lora=LORA)
    freeze_for_stage(model, ["connector", "llm"])
    stage = StageConfig(
        name="instruct",
        train=["connector", "llm"],
        lr=2e-5,
        global_batch_size=4,
        per_device_batch_size=4,
        llm_lora={"rank": 4, "lr": 2e-4},
    )
    groups = {g.get("lr"): {id(p) for p in g["params"]} for g in _param_groups(model, stage)}
    assert groups == {
        None: {id(p) for p in model.vlm.model.multi_modal_projector.parameters()},  # the stage lr
        2e-4: {id(p) for p in lora_parameters(model.vlm)},
    }


def test_the_saved_adapter_reloads_merges_and_loads_in_peft_alike(tmp_path) -> None:
    model, batch, _ = trained_lora_model()
    expected = logits(model, batch)
    save_model(model, tmp_path)
    assert (tmp_path / "llm_lora" / "adapter_config.json").is_file()

    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "vlm")  # the base weights, a plain LLaVA
    assert not any("lora_" in k or "base_layer" in k for k in base.state_dict())
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(base, tmp_path / "llm_lora").eval()
        peft_logits = peft_model(**{k: batch[k] for k in VLM_INPUTS}).logits
    torch.testing.assert_close(peft_logits, expected, rtol=0, atol=1e-6)  # peft's own loader agrees

    recipe = tiny_recipe()
    unmerged = load_vlm(tmp_path, recipe, merge_lora=False)
    assert has_llm_lora(unmerged.vlm)
    torch.testing.assert_close(logits(unmerged, batch), expected, rtol=0, atol=0)
    merged = load_vlm(tmp_path, recipe)
    assert not has_llm_lora(merged.vlm)
    assert not any("lora_" in k or "base_layer" in k for k in merged.vlm.state_dict())
    torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-5, atol=1e-5)


def test_llm_lora_needs_the_llm_in_train_and_target_modules_that_exist() -> None:
    data = recipe_dict()
    data["stages"][0]["llm_lora"] = {"rank": 8}
    with pytest.raises(RecipeError, match=r"stages\.0.*llm_lora") as err:
        validate_recipe(data)
    assert "llm" in str(err.value)
    with pytest.raises(RecipeError, match=r"llm_lora\.target_modules"):
        tiny_model(tiny_recipe(), llm_lora=LLMLoraConfig(target_modules=["no_such_proj"]))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """Stage 2 of the tiny recipe with LoRA on its LLM, 4 steps, a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("lora")
    data = prepare_small_synthetic(root / "data", n=32)
    overrides = tiny_overrides(
        data,
        root / "run",
        steps=4,
        **{"stages.1.llm_lora": "{rank: 4, alpha: 8}", "stages.1.train": "[connector, llm, supervision]"},
    )
    train(load_recipe("tiny-synthetic", overrides), TrainOptions(stages=["instruct"], progress=False))
    return root / "run", overrides


def test_resume_mid_stage_restores_the_adapter(lora_run, tmp_path) -> None:
    run, overrides = lora_run
    final = run / "instruct" / "final"
    assert (final / "llm_lora" / "adapter_model.safetensors").is_file()
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "instruct" / "final")  # as if killed after step 3
    assert [p.name for p in (resumed / "instruct" / "checkpoints").iterdir()] == ["step-0000002"]
    recipe = load_recipe("tiny-synthetic", [*overrides, f"run.output_dir={resumed}"])
    train(recipe, TrainOptions(stages=["instruct"], resume=True, progress=False))
    for part in ("llm_lora/adapter_model.safetensors", "vlm/model.safetensors"):
        with safe_open(str(final / part), "pt") as a, safe_open(str(resumed / "instruct" / "final" / part), "pt") as b:
            assert list(a.keys()) == list(b.keys())
            for key in a.keys():  # noqa: SIM118 - safe_open is not a dict
                torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=1e-5, atol=1e-6, msg=key)


def test_strip_merges_the_adapter_into_a_plain_llava(lora_run, tmp_path) -> None:
    run, _ = lora_run
    report = strip(run, tmp_path / "model")
    for shard in (tmp_path / "model").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            keys = list(f.keys())
        assert all(k.startswith(LLAVA_PREFIXES) for k in keys)
        assert not any("lora_" in k or "base_layer" in k for k in keys)
    loaded, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _, unmerged = load_trained(run)  # the adapter in the LLM, not merged: the training model's logits
    assert has_llm_lora(unmerged.vlm)
    batch = probe_batch(unmerged)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, unmerged.vlm(**batch).logits, rtol=1e-5, atol=1e-5)
    assert report.max_logit_diff < 1e-4
