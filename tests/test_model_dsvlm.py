"""The DS-VLM wrapper: where each loss's gradient goes, plain-LLaVA equivalence, freezing, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from helpers import tiny_diffusion, tiny_model
from test_model_fixtures import CLIP, LLAMA, UNET, VAE, example, recipe_dict, tiny_recipe
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration

from dsvlm.data.synthetic import synthetic_vocabulary
from dsvlm.model.collate import Collator
from dsvlm.model.dsvlm import DSVLM, encoder_layers, load_model, save_model
from dsvlm.model.freeze import freeze_for_stage
from dsvlm.model.templates import CHAT_TEMPLATES
from dsvlm.model.tokenizer import build_word_tokenizer
from dsvlm.recipe import load_recipe
from dsvlm.recipe.schema import Recipe

VLM_INPUTS = ("input_ids", "attention_mask", "pixel_values")


def batch_for(model: DSVLM, n: int = 4, text_only: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    examples = [example(i, with_image=i not in text_only, answer="ABCD"[i % 4]) for i in range(n)]
    batch = Collator(model.processor, "chat", max_length=64, rec_resolution=16)(examples)
    batch["noise_seeds"] = batch["sample_index"] + 100
    return batch


def grads(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_reconstruction_loss_reaches_encoder_and_connector_but_not_the_llm() -> None:
    model = tiny_model(tiny_recipe())
    out = model(batch_for(model))
    assert out.n_rec == 4 and out.rec_loss > 0
    out.rec_loss.backward()
    vlm = model.vlm
    assert grads(vlm.model.vision_tower) > 0
    assert grads(vlm.model.multi_modal_projector) > 0
    assert grads(vlm.model.language_model) == 0 and grads(vlm.lm_head) == 0
    assert grads(model.supervision.adapters) > 0


def test_text_loss_reaches_the_llm() -> None:
    model = tiny_model(tiny_recipe())
    out = model(batch_for(model), supervise=False)
    assert out.n_rec == 0 and out.rec_loss == 0
    out.loss.backward()
    assert grads(model.vlm.model.language_model) > 0 and grads(model.vlm.lm_head) > 0
    assert grads(model.supervision) == 0


def test_an_optimizer_step_leaves_the_frozen_unet_and_vae_bit_identical() -> None:
    model = tiny_model(tiny_recipe(freeze_unet=True))
    freeze_for_stage(model, ["connector", "vision", "supervision"])
    branch = model.supervision
    for moe in branch.moe:  # a non-uniform router, so every branch's K/V gets a gradient of its own
        torch.nn.init.normal_(moe.router.weight)
    before = {k: v.clone() for k, v in branch.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(batch_for(model)).loss.backward()
    optimizer.step()
    after = branch.state_dict()
    new = [k for k in after if ".processor." in k]
    assert new and all(not torch.equal(before[k], after[k]) for k in new)
    frozen = [k for k in after if (k.startswith("unet.") and ".processor." not in k) or k.startswith("vae.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)


@pytest.mark.parametrize("variant", ["disabled", "zero_weight"])
def test_without_supervision_loss_and_logits_are_plain_llava(variant: str) -> None:
    recipe = (
        tiny_recipe(weight=0.0)
        if variant == "zero_weight"
        else Recipe.model_validate(
            {
                **recipe_dict(),
                "supervision": {"enabled": False},
                "stages": [{**recipe_dict()["stages"][0], "train": ["connector"]}],
            }
        )
    )
    model = tiny_model(recipe)
    batch = batch_for(model, text_only=(2,))
    out = model(batch)
    plain = LlavaForConditionalGeneration(model.vlm.config)
    plain.load_state_dict(model.vlm.state_dict())
    reference = plain(**{k: batch[k] for k in VLM_INPUTS}, labels=batch["labels"])
    assert torch.equal(out.logits, reference.logits)
    assert torch.allclose(out.loss, reference.loss, atol=1e-6, rtol=1e-6)
    assert out.rec_loss == 0 and out.n_rec == 0


@pytest.mark.parametrize(
    "conditions",
    [
        {"connector": True, "vision_layers": []},
        {"connector": False, "vision_layers": [2]},
        {"connector": True, "vision_layers": [1, 2, 3]},
    ],
    ids=["connector", "levels", "all"],
)
def test_each_condition_subset_trains(conditions: dict) -> None:
    model = tiny_model(tiny_recipe(**conditions))
    out = model(batch_for(model))
    out.loss.backward()
    assert grads(model.vlm.model.multi_modal_projector) > 0
    assert len(model.supervision.condition_names) == int(conditions["connector"]) + len(conditions["vision_layers"])


@pytest.mark.parametrize("combo", [("clip", "llama", "vicuna"), ("siglip", "qwen2", "chatml")])
def test_encoder_llm_combinations_train(combo: tuple[str, str, str]) -> None:
    model = tiny_model(tiny_recipe(*combo, loss={"perceptual": 1.0, "eps_mse": 1.0}))
    out = model(batch_for(model, text_only=(1,)))
    assert out.n_rec == 3 and out.n_text_tokens == 8  # answer letter + terminator, four samples
    out.loss.backward()
    assert grads(model.vlm.model.vision_tower) > 0 and grads(model.vlm.model.language_model) > 0


def test_reconstruct_per_batch_and_normalisers() -> None:
    model = tiny_model(tiny_recipe(reconstruct_per_batch=2))
    batch = batch_for(model)
    out = model(batch)
    assert out.n_rec == 2
    scaled = model(batch, text_normalizer=2 * out.n_text_tokens, rec_normalizer=4.0)
    assert torch.allclose(scaled.text_loss, out.text_loss / 2) and torch.allclose(scaled.rec_loss, out.rec_loss / 2)
    originals, one_step, sampled = model.reconstruct(batch, n=3, steps=2)
    assert originals.shape == one_step.shape == sampled.shape == (3, 3, 16, 16)
    # The first n images of the batch in [0, 1]; the one-step reconstructions and the samples from pure noise
    # are the branch's own (not the originals, not each other).
    torch.testing.assert_close(originals, (batch["rec_pixels"][:3].float() + 1) / 2)
    assert not torch.allclose(one_step, originals) and not torch.allclose(sampled, one_step)


def test_one_step_preview_at_the_lowest_noise_is_the_image_in_pixel_space() -> None:
    """With ε-prediction, x̂0 from t=0 is the image whatever the UNet predicts (the noise is 1% there); sampling
    from pure noise is not."""
    epsilon = tiny_diffusion("epsilon")
    model = tiny_model(load_recipe("tiny-synthetic", [f"supervision.diffusion.pretrained={epsilon}"]))
    examples = [example(i) for i in range(3)]
    for item in examples:
        item["image"] = item["image"].resize((32, 32))
    batch = Collator(model.processor, "chat", max_length=64, rec_resolution=32)(examples)
    originals, nearly_clean, sampled = model.reconstruct(batch, n=3, steps=2, timestep=0)
    assert float((nearly_clean - originals).abs().max()) < 0.1 < float((sampled - originals).abs().max())


def unread_vision_modules(tower: torch.nn.Module) -> set[str]:
    return {
        name.rsplit(".", 1)[0].split(".self_attn")[0].split(".mlp")[0].split(".layer_norm")[0]
        for name, p in tower.named_parameters()
        if not p.requires_grad
    }


def test_freeze_for_stage_trains_exactly_the_named_groups() -> None:
    recipe = Recipe.model_validate(
        {**recipe_dict(freeze_unet=True), "model": {**recipe_dict()["model"], "connector": "linear"}}
    )
    model = tiny_model(recipe)
    rows = {r["module"]: r for r in freeze_for_stage(model, ["connector", "supervision"])}
    assert rows["vision"]["trainable"] == 0 and rows["llm"]["trainable"] == 0
    projector = model.vlm.model.multi_modal_projector
    assert projector.linear_1.weight.requires_grad and not projector.linear_2.weight.requires_grad
    assert rows["unet"]["trainable"] == 0 and rows["vae"]["trainable"] == 0
    assert rows["supervision (adapters, new K/V, routers, LoRA)"]["frozen"] == 0
    rows = {r["module"]: r for r in freeze_for_stage(model, ["vision", "llm"])}
    assert rows["llm"]["frozen"] == 0 and rows["connector"]["trainable"] == 0
    # The parameters no loss reaches stay frozen (an FSDP resume refuses trainable parameters without optimizer
    # state): the pooling tail always; the last layer once neither the connector (-2 of 3 layers) nor the branch
    # reads its output.
    tower = model.vlm.model.vision_tower
    assert len(encoder_layers(tower)) == 3 and model.supervision.config.vision_layers == [1, 3]
    assert unread_vision_modules(tower) == {"post_layernorm"}
    model.supervision.config.vision_layers = [1, 2]
    freeze_for_stage(model, ["vision", "llm"])
    assert unread_vision_modules(tower) == {"post_layernorm", "encoder.layers.2"}
    assert not any(p.requires_grad for p in model.supervision.parameters())
    trainable_unet = tiny_model(tiny_recipe(freeze_unet=False))
    rows = {r["module"]: r for r in freeze_for_stage(trainable_unet, ["supervision"])}
    assert rows["unet"]["frozen"] == 0 and rows["vae"]["trainable"] == 0


def test_gradient_checkpointing_keeps_the_reconstruction_gradient() -> None:
    model = tiny_model(tiny_recipe())
    model.vlm.activation_checkpointing_enable()
    model.train()
    out = model(batch_for(model))
    out.rec_loss.backward()
    assert grads(model.vlm.model.vision_tower.embeddings) > 0


def pretrained_parts(root) -> dict:
    """Save tiny CLIP, Llama (+ tokenizer), UNet/VAE/scheduler as the hub would hold them."""
    CLIPModel(CLIPConfig(vision_config=CLIP, text_config={**CLIP, "vocab_size": 50})).save_pretrained(root / "clip")
    LlamaForCausalLM(LlamaConfig(**LLAMA, vocab_size=120)).save_pretrained(root / "llama")
    build_word_tokenizer(CHAT_TEMPLATES["vicuna"], synthetic_vocabulary()).save_pretrained(root / "llama")
    UNet2DConditionModel(**UNET).save_pretrained(root / "sd" / "unet")
    AutoencoderKL(**VAE).save_pretrained(root / "sd" / "vae")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(root / "sd" / "scheduler")
    data = recipe_dict(template="vicuna", loss={"perceptual": 1.0}, freeze_unet=True)
    data["model"]["vision"] = {"pretrained": str(root / "clip")}
    data["model"]["llm"] = {"pretrained": str(root / "llama")}
    data["supervision"]["diffusion"] = {"pretrained": str(root / "sd")}
    return data


def test_build_from_pretrained_directories_and_round_trip(tmp_path) -> None:
    recipe = Recipe.model_validate(pretrained_parts(tmp_path))
    model = tiny_model(recipe)
    sd_unet = UNet2DConditionModel.from_pretrained(tmp_path / "sd" / "unet")
    assert torch.equal(model.supervision.unet.conv_in.weight, sd_unet.conv_in.weight)
    freeze_for_stage(model, ["connector", "supervision"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = batch_for(model)
    model(batch).loss.backward()
    optimizer.step()

    save_model(model, tmp_path / "out")
    info = json.loads((tmp_path / "out" / "supervision" / "supervision.json").read_text())
    assert not info["unet_saved"] and not info["vae_saved"]  # frozen pretrained: reloaded from the source
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out" / "vlm")
    loaded = load_model(tmp_path / "out", recipe)
    with torch.no_grad():
        expected, again = model(batch), loaded(batch)
        assert torch.equal(expected.logits, again.logits)
        assert torch.equal(expected.logits, plain(**{k: batch[k] for k in VLM_INPUTS}).logits)
        assert torch.allclose(expected.rec_loss, again.rec_loss)
    assert torch.equal(tiny_model(recipe, init=tmp_path / "out").vlm.lm_head.weight, model.vlm.lm_head.weight)


def test_inline_branch_saves_its_trained_unet(tmp_path) -> None:
    recipe = tiny_recipe(freeze_unet=False, lora_rank=2)
    model = tiny_model(recipe)
    freeze_for_stage(model, ["supervision"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = batch_for(model)
    model(batch).loss.backward()
    optimizer.step()
    save_model(model, tmp_path)
    info = json.loads((tmp_path / "supervision" / "supervision.json").read_text())
    assert info["unet_saved"] and info["vae_saved"]
    loaded = load_model(tmp_path, recipe)
    for (name, a), b in zip(
        model.supervision.state_dict().items(), loaded.supervision.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nothing", recipe)
