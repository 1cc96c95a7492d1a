"""Tiny configs and data shared by the model tests (no tests here): seconds on a CPU, nothing downloaded."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from PIL import Image

from dsvlm.recipe.schema import Recipe

CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 8,
}
SIGLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 8,
}
LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
QWEN2 = dict(LLAMA)
# A latent-space UNet over a 4-channel VAE at 16 px (8x8 latents), one cross-attention down and up block.
UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [8, 16],
    "norm_num_groups": 4,
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
PIXEL_UNET = {**UNET, "sample_size": 16, "in_channels": 3, "out_channels": 3}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 16,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
}


def recipe_dict(
    vision: str = "clip", llm: str = "llama", template: str = "dsvlm", **supervision: Any
) -> dict[str, Any]:
    """A tiny recipe as a dict: inline encoder/LLM, inline latent UNet + VAE, frozen UNet (paper layout)."""
    return {
        "model": {
            "vision": {"type": vision, "config": copy.deepcopy(CLIP if vision == "clip" else SIGLIP)},
            "llm": {"type": llm, "config": copy.deepcopy(LLAMA if llm == "llama" else QWEN2)},
            "chat_template": template,
            "attn_implementation": "sdpa",
        },
        "supervision": {
            "diffusion": {
                "pretrained": None,
                "unet_config": copy.deepcopy(UNET),
                "vae_config": copy.deepcopy(VAE),
                "num_train_timesteps": 100,
            },
            "vision_layers": [1, 3],
            "connector": True,
            "loss": {"mae": 1.0},
            "resolution": 16,
            "timestep_range": [10, 60],
            "sampler_steps": 3,
            **supervision,
        },
        "stages": [
            {
                "name": "align",
                "train": ["connector", "supervision"],
                "lr": 1e-3,
                "global_batch_size": 4,
                "per_device_batch_size": 4,
                "precision": "fp32",
            }
        ],
    }


def tiny_recipe(vision: str = "clip", llm: str = "llama", template: str = "dsvlm", **supervision: Any) -> Recipe:
    return Recipe.model_validate(recipe_dict(vision, llm, template, **supervision))


def image(seed: int, size: int = 16) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def example(index: int, with_image: bool = True, answer: str = "A") -> dict[str, Any]:
    """A LLaVA-format multiple-choice example built from synthetic-dataset words."""
    question = "What colour is the shape ?"
    return {
        "index": index,
        "id": f"ex{index}",
        "image": image(index) if with_image else None,
        "conversations": [
            {"from": "human", "value": ("<image>\n" if with_image else "") + question},
            {"from": "gpt", "value": answer},
        ],
        "latent": None,
    }
