"""How many tokens one image takes in the LLM's sequence: the one place dsvlm computes it."""

from __future__ import annotations

from transformers import LlavaProcessor


def image_token_count(processor: LlavaProcessor, height: int, width: int) -> int:
    """Tokens `<image>` expands to for a (height, width) encoder input, by `LlavaProcessor`'s own arithmetic:
    one per patch, plus the encoder's extra (CLS) tokens, minus the CLS the `default` feature strategy drops.

    The model config's `image_seq_length` and the training collator both use it, so they cannot disagree
    with each other or with the processor that expands `<image>` at evaluation.
    """
    count = (height // processor.patch_size) * (width // processor.patch_size) + processor.num_additional_image_tokens
    return count - (1 if processor.vision_feature_select_strategy == "default" else 0)
