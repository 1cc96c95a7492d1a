"""The LLaVA builder, prompt formats, tokenizer and collator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_vlm
from PIL import Image
from test_model_fixtures import CLIP, LLAMA, example, image, tiny_recipe
from transformers import (
    AutoConfig,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    LlavaForConditionalGeneration,
)

from dsvlm.data.geometry import SquareGeometry
from dsvlm.data.synthetic import synthetic_vocabulary
from dsvlm.errors import DataError, RecipeError
from dsvlm.model.collate import IGNORE_INDEX, Collator
from dsvlm.model.image_tokens import image_token_count
from dsvlm.model.supervision.vae import vae_input
from dsvlm.model.templates import CHAT_TEMPLATES, IMAGE_TOKEN
from dsvlm.model.tokenizer import build_word_tokenizer
from dsvlm.model.vlm import image_geometry
from dsvlm.recipe.schema import ModelConfig

QUESTION = "What colour is the shape ?"


def two_turns() -> dict:
    ex = example(0)
    ex["conversations"] += [{"from": "human", "value": "Is the shape red ?"}, {"from": "gpt", "value": "Yes"}]
    return ex


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_string_and_list_content_render_alike(name: str) -> None:
    tokenizer = build_word_tokenizer(CHAT_TEMPLATES[name], synthetic_vocabulary())
    as_string = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{QUESTION}"}]
    as_list = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    rendered = [
        tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in (as_string, as_list)
    ]
    assert rendered[0] == rendered[1]
    assert rendered[0].count(IMAGE_TOKEN) == 1


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_chat_labels_are_the_answers_and_their_terminators(name: str) -> None:
    vlm, processor = tiny_vlm(tiny_recipe(template=name).model)
    batch = Collator(processor, "chat", max_length=256)([two_turns()])
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX])
    terminator = CHAT_TEMPLATES[name].terminator
    assert tokens == ["A", terminator, "Yes", terminator]
    assert processor.tokenizer.eos_token == terminator
    assert vlm.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids(terminator)
    # no unknown words: the vocabulary covers the synthetic text and the template's own words
    assert processor.tokenizer.unk_token_id not in batch["input_ids"][0].tolist()


def test_plain_format_is_image_caption_eos_with_loss_on_the_caption() -> None:
    vlm, processor = tiny_vlm(tiny_recipe().model)
    ex = example(0, answer="A red circle .")
    batch = Collator(processor, "plain", max_length=64)([ex])
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    n_image = vlm.config.image_seq_length
    assert tokens == [IMAGE_TOKEN] * n_image + ["A", "red", "circle", ".", "<end>"]
    labelled = processor.tokenizer.convert_ids_to_tokens(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX])
    assert labelled == ["A", "red", "circle", ".", "<end>"]


def test_word_tokenizer_gives_single_letter_answers() -> None:
    tokenizer = build_word_tokenizer(CHAT_TEMPLATES["dsvlm"], synthetic_vocabulary())
    assert set(synthetic_vocabulary()) <= set(tokenizer.get_vocab())
    for letter in "ABCD":
        ids = tokenizer(f"{letter} <end>", add_special_tokens=False)["input_ids"]
        assert len(ids) == 2
        assert tokenizer.decode(ids[:1]) == letter
        assert tokenizer.decode(ids, skip_special_tokens=True) == letter


def test_clip_llama_llava_loads_back_with_plain_transformers(tmp_path) -> None:
    vlm, processor = tiny_vlm(tiny_recipe().model, seed=3)
    assert vlm.config.vision_feature_select_strategy == "default"
    assert processor.num_additional_image_tokens == 1
    assert vlm.config.image_seq_length == (16 // 8) ** 2  # CLS dropped
    vlm.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = loaded_processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = loaded_processor(images=[image(1)], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(vlm.eval()(**inputs).logits, loaded(**inputs).logits)
        generated = loaded.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_siglip_qwen2_keeps_every_patch_token() -> None:
    vlm, processor = tiny_vlm(tiny_recipe("siglip", "qwen2", "chatml").model)
    assert vlm.config.vision_feature_select_strategy == "full"
    assert processor.num_additional_image_tokens == 0
    assert vlm.config.image_seq_length == 4
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image(1)], text=[prompt], return_tensors="pt")
    assert vlm(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_seed_makes_init_deterministic() -> None:
    cfg = tiny_recipe().model
    a, b, c = tiny_vlm(cfg, seed=1)[0], tiny_vlm(cfg, seed=1)[0], tiny_vlm(cfg, seed=2)[0]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert not torch.equal(a.model.multi_modal_projector.linear_1.weight, c.model.multi_modal_projector.linear_1.weight)


def test_linear_connector_is_one_linear_map() -> None:
    cfg = tiny_recipe().model.model_copy(update={"connector": "linear"})
    vlm, _ = tiny_vlm(cfg)
    projector = vlm.model.multi_modal_projector
    x = torch.randn(3, 32)
    expected = x @ projector.linear_1.weight.T + projector.linear_1.bias
    assert torch.allclose(projector(x), expected, atol=1e-6)


def test_pretrained_encoder_and_llm_directories(tmp_path) -> None:
    clip = CLIPModel(CLIPConfig(vision_config=CLIP, text_config={**CLIP, "vocab_size": 50}))
    clip.save_pretrained(tmp_path / "clip")  # a full CLIP checkpoint, as on the hub: only its vision half is used
    llm = LlamaForCausalLM(LlamaConfig(**LLAMA, vocab_size=120))
    llm.save_pretrained(tmp_path / "llama")
    pieces = ["<unk>", "<s>", "</s>", "▁", *"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz:?.'\n"]
    # a Llama tokenizer that prepends BOS by itself, as Vicuna's does
    LlamaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], add_bos_token=True).save_pretrained(
        tmp_path / "llama"
    )
    cfg = ModelConfig(
        vision={"pretrained": str(tmp_path / "clip")},
        llm={"pretrained": str(tmp_path / "llama")},
        chat_template="vicuna",
    )
    vlm, processor = tiny_vlm(cfg)
    for name, tensor in clip.vision_model.state_dict().items():
        assert torch.equal(vlm.model.vision_tower.state_dict()[name], tensor), name
    assert torch.equal(vlm.model.language_model.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight)
    assert vlm.get_input_embeddings().num_embeddings == 120  # the tokenizer fits: nothing to grow
    assert processor.image_processor.crop_size == {"height": 16, "width": 16}

    # inference through the processor (lmms-eval llava_hf) sees exactly the training ids: one BOS, one <image>
    tokenizer = processor.tokenizer
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = processor(images=[image(0)], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    trained = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert [i for i in ids if i != image_id] == [i for i in trained["input_ids"] if i != image_id]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids.count(image_id) == vlm.config.image_seq_length
    with pytest.raises(RecipeError, match="image_size"):
        tiny_vlm(cfg.model_copy(update={"image_size": 32}))


def test_collator_batch_layout() -> None:
    vlm, processor = tiny_vlm(tiny_recipe().model)
    examples = [example(0), example(1, with_image=False), example(2)]
    examples[0]["latent"] = torch.zeros(4, 8, 8)
    batch = Collator(processor, "chat", max_length=64, rec_resolution=16)(examples)
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["rec_pixels"].shape == (2, 3, 16, 16)
    # The imaged examples' own pixels, in order (the text-only one skipped), scaled from 0..255 to [-1, 1].
    for row, index in enumerate((0, 2)):
        pixels = torch.from_numpy(np.asarray(image(index), dtype=np.float32)).permute(2, 0, 1)
        torch.testing.assert_close(batch["rec_pixels"][row], pixels / 127.5 - 1)
    assert "latents" not in batch  # one imaged example lacks its latent: the branch encodes them all
    assert batch["image_mask"].tolist() == [True, False, True]
    assert batch["sample_index"].tolist() == [0, 1, 2]
    n_image = (batch["input_ids"] == vlm.config.image_token_index).sum(dim=1).tolist()
    assert n_image == [vlm.config.image_seq_length, 0, vlm.config.image_seq_length]
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # right padding
    assert batch["attention_mask"][1, -1] == 0 and batch["labels"][1, -1] == IGNORE_INDEX
    vlm(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})

    examples[2]["latent"] = torch.ones(4, 8, 8)
    with_latents = Collator(processor, "chat", max_length=64)(examples)
    assert with_latents["latents"].shape == (2, 4, 8, 8) and "rec_pixels" not in with_latents
    text_only = Collator(processor, "chat", max_length=64)([example(1, with_image=False)])
    assert "pixel_values" not in text_only and not text_only["image_mask"].any()


def test_collator_refuses_inconsistent_examples() -> None:
    _, processor = tiny_vlm(tiny_recipe().model)
    collate = Collator(processor, "chat", max_length=64)
    orphan = example(0, with_image=False)
    orphan["conversations"][0]["value"] = "<image>\n" + QUESTION
    with pytest.raises(DataError, match="no image"):
        collate([orphan])
    with pytest.raises(DataError, match="max_length"):
        Collator(processor, "chat", max_length=2)([example(0)])
    missing = example(0)
    missing["conversations"][0]["value"] = QUESTION  # the image token is added in front
    assert (collate([missing])["input_ids"] == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).any()


def two_colour_image() -> Image.Image:
    """48 wide x 24 high: red left half, blue right half (an aspect ratio and a layout that geometry changes)."""
    pixels = np.zeros((24, 48, 3), dtype=np.uint8)
    pixels[:, :24] = (255, 0, 0)
    pixels[:, 24:] = (0, 0, 255)
    return Image.fromarray(pixels)


def expected_square(mode: str, fill: tuple[int, int, int]) -> Image.Image:
    """The square the encoder must get, built by hand: padded top and bottom, or the centre 24 x 24."""
    if mode == "pad":
        square = Image.new("RGB", (48, 48), fill)
        square.paste(two_colour_image(), (0, 12))
        return square
    return two_colour_image().crop((12, 0, 36, 24))


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_reconstruction_target_is_the_geometry_the_encoder_saw(mode: str) -> None:
    _, processor = tiny_vlm(tiny_recipe().model)
    fill = tuple(int(x * 255) for x in processor.image_processor.image_mean)
    ex = example(0)
    ex["image"] = two_colour_image()
    batch = Collator(processor, "chat", max_length=64, rec_resolution=16, image_aspect_ratio=mode)([ex])
    square = expected_square(mode, fill)
    encoder_input = processor.image_processor(images=[square], return_tensors="pt")["pixel_values"]
    assert torch.equal(batch["pixel_values"], encoder_input)
    assert torch.equal(batch["rec_pixels"][0], vae_input(square, 16))
    # The layout itself, independently of the helpers: where the fill, the red and the blue are.
    target = ((batch["rec_pixels"][0] + 1) * 127.5).round()
    red, blue = torch.tensor([255.0, 0, 0]), torch.tensor([0, 0, 255.0])
    middle = 8  # row 8 of 16 is inside the picture in both modes
    assert torch.allclose(target[:, middle, 1], red, atol=2) and torch.allclose(target[:, middle, 14], blue, atol=2)
    if mode == "pad":
        assert torch.allclose(target[:, 0, 8], torch.tensor(fill, dtype=torch.float32), atol=2)
        assert torch.allclose(target[:, 15, 8], torch.tensor(fill, dtype=torch.float32), atol=2)
    else:
        assert torch.allclose(target[:, 0, 1], red, atol=2) and torch.allclose(target[:, 15, 14], blue, atol=2)


def test_image_geometry_matches_the_collator_and_is_saved_for_evaluation(tmp_path) -> None:
    cfg = tiny_recipe().model.model_copy(update={"image_aspect_ratio": "crop"})
    vlm, processor = tiny_vlm(cfg)
    assert image_geometry(cfg) == Collator(processor, "chat", 64, image_aspect_ratio="crop").geometry
    assert image_geometry(tiny_recipe().model) == SquareGeometry("pad", (122, 116, 104))  # CLIP's mean colour
    vlm.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).image_aspect_ratio == "crop"


@pytest.mark.parametrize(("vision", "llm", "template"), [("clip", "llama", "dsvlm"), ("siglip", "qwen2", "chatml")])
def test_image_token_count_is_what_the_processor_and_model_use(vision: str, llm: str, template: str) -> None:
    """Oracle: the one token-count helper agrees with LlavaProcessor's own `<image>` expansion and with the
    number of features the model produces for the image."""
    vlm, processor = tiny_vlm(tiny_recipe(vision, llm, template).model)
    expanded = processor(images=[image(0)], text=[IMAGE_TOKEN], return_tensors="pt")
    side = expanded["pixel_values"].shape[-1]
    count = image_token_count(processor, side, side)
    assert count == int((expanded["input_ids"] == vlm.config.image_token_index).sum()) == vlm.config.image_seq_length
    with torch.no_grad():
        features = vlm.model.get_image_features(pixel_values=expanded["pixel_values"]).pooler_output
    assert sum(f.shape[0] for f in features) == count
    batch = Collator(processor, "chat", max_length=64)([example(0)])
    assert int((batch["input_ids"] == vlm.config.image_token_index).sum()) == count
