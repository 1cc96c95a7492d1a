"""Randomly initialised components with the paper's real architectures, saved as ordinary HF / diffusers dirs.

No hub access is needed: every config is written out here by hand from the published `config.json` files
(openai/clip-vit-large-patch14-336, google/siglip-so400m-patch14-384, lmsys/vicuna-7b-v1.5,
Qwen/Qwen2-7B-Instruct, stable-diffusion-v1-5/stable-diffusion-v1-5). Tokenizers are trained offline with
`tokenizers` on a small corpus, with the special tokens of the real ones. Used by `real_shapes.py` (CPU, LLM
layers cut) and `gpu_overhead.py` (one GPU, full layer counts).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

CLIP_L14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}
CLIP_PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 336},
    "do_center_crop": True,
    "crop_size": {"height": 336, "width": 336},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
SIGLIP_SO400M_384 = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "num_channels": 3,
}
SIGLIP_PREPROCESSOR = {
    "image_processor_type": "SiglipImageProcessor",
    "do_resize": True,
    "size": {"height": 384, "width": 384},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "resample": 3,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
VICUNA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
QWEN2_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

CORPUS = [
    "A photo of a red car parked on the side of a quiet street.",
    "Two people walking a dog along the beach at sunset.",
    "A plate with a sandwich, some fries and a glass of water.",
    "What is the colour of the shape? Answer with the option's letter from the given choices directly.",
    "The image shows a blue square on a grey background next to a green circle.",
    "How many objects are there in the picture? There are three objects.",
    "Describe the image in detail. The scene is a kitchen with a wooden table.",
    "A cat sleeping on a sofa near the window, with sunlight on the floor.",
    "Is there a person in the image? Yes, a man is riding a bicycle.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: Hint: Question: Options: A. B. C. D. red green blue yellow",
]


def corpus() -> list[str]:
    """Training text of the offline tokenizers (enough words for records, prompts and benchmark items)."""
    return CORPUS * 4


def llama_tokenizer(out: Path, texts: Iterable[str], vocab_size: int = 2000) -> Path:
    """A Llama-style tokenizer (SentencePiece-like metaspace BPE, `<unk>`=0, `<s>`=1, `</s>`=2 as Vicuna's),
    trained on `texts` and saved as a LlamaTokenizerFast directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(list(texts), trainer)
    tokenizer = LlamaTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
    )
    tokenizer.save_pretrained(out)
    return out


def qwen2_tokenizer(out: Path, texts: Iterable[str], vocab_size: int = 2000) -> Path:
    """A Qwen2-style tokenizer (byte-level BPE, no BOS, `<|endoftext|>` pad, chatml's `<|im_start|>` /
    `<|im_end|>` as special tokens, eos `<|im_end|>` as Qwen2-7B-Instruct's), saved as Qwen2TokenizerFast."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(list(texts), trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    tokenizer.save_pretrained(out)
    return out


def _seeded(seed: int, build: Callable[[], Any], device: str) -> Any:
    """`build()` under a fixed seed, its tensors created on `device` (a GPU builds 7B in seconds)."""
    import torch  # lazily: `_common` sets the thread environment before torch loads

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return build()


def _save(model: Any, out: Path, dtype: str) -> None:
    import torch

    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)


def vision_encoder(out: Path, family: str, dtype: str = "float32", device: str = "cpu", **cut: Any) -> Path:
    """CLIP ViT-L/14-336 (`clip`) or SigLIP-SO400M/14-384 (`siglip`), random weights, with its preprocessor;
    `cut` replaces config fields (the smoke sizes)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    shape, pre = (CLIP_L14_336, CLIP_PREPROCESSOR) if family == "clip" else (SIGLIP_SO400M_384, SIGLIP_PREPROCESSOR)
    options = {**shape, **cut}
    config_cls, model_cls = (
        (CLIPVisionConfig, CLIPVisionModel) if family == "clip" else (SiglipVisionConfig, SiglipVisionModel)
    )
    model = _seeded(0, lambda: model_cls(config_cls(**options)), device)
    _save(model, out, dtype)
    del model
    size = options["image_size"]
    pre = {
        **pre,
        **(
            {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
            if family == "clip"
            else {"size": {"height": size, "width": size}}
        ),
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return out


def llm(out: Path, family: str, tokenizer_dir: Path, dtype: str = "float32", device: str = "cpu", **cut: Any) -> Path:
    """Vicuna-7B (`llama`) or Qwen2-7B (`qwen2`) shapes, random weights, `cut` replacing config fields (e.g.
    num_hidden_layers), plus the tokenizer files copied in (the directory `model.llm.pretrained` expects)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = VICUNA_7B if family == "llama" else QWEN2_7B
    options = {**shape, **cut}
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    model = _seeded(1, lambda: model_cls(config_cls(**options)), device)
    _save(model, out, dtype)
    del model
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def stable_diffusion(
    out: Path,
    dtype: str = "float32",
    device: str = "cpu",
    unet_cut: dict[str, Any] | None = None,
    vae_cut: dict[str, Any] | None = None,
) -> Path:
    """SD 1.5's UNet, VAE and scheduler config as a diffusers directory (unet/, vae/, scheduler/)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = _seeded(2, lambda: UNet2DConditionModel(**{**SD15_UNET, **(unet_cut or {})}), device)
    _save(unet, out / "unet", dtype)
    del unet
    vae = _seeded(3, lambda: AutoencoderKL(**{**SD15_VAE, **(vae_cut or {})}), device)
    _save(vae, out / "vae", dtype)
    del vae
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2))
    (out / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}, indent=2))
    return out


def recipe_overrides(vision: Path, llm: Path, diffusion: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    """A bundled paper recipe pointed at the built components and data, with a one-image, two-step preview (the
    recipe's 4-image, 50-step grid would outlast the measured steps), metrics on every step, then `extra`."""
    return [
        f"model.vision.pretrained={vision}",
        f"model.llm.pretrained={llm}",
        f"supervision.diffusion.pretrained={diffusion}",
        f"data.dataset={data}",
        f"run.output_dir={run_dir}",
        "run.log_every=1",
        "run.preview_images=1",
        "supervision.sampler_steps=2",
        *extra,
    ]
