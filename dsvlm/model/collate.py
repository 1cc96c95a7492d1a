"""Turn LLaVA-format examples into a training batch for `DSVLM.forward`."""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import LlavaProcessor

from dsvlm.data.geometry import AspectRatio, SquareGeometry
from dsvlm.errors import DataError
from dsvlm.model.image_tokens import image_token_count
from dsvlm.model.supervision.vae import vae_input
from dsvlm.model.templates import IMAGE_TOKEN, PLAIN_TEMPLATE

IGNORE_INDEX = -100
_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class Collator:
    """Tokenise, expand the image token, build labels and image tensors for a list of examples.

    An example is `{"index", "id", "image": PIL.Image | None, "conversations": [{"from", "value"}],
    "latent": Tensor | None}` (LLaVA format, `<image>` inside the first human value; it is prepended when an
    imaged example lacks it). The text is tokenised with ONE `<image>` token and the template's assistant mask,
    then that token is expanded to the encoder's token count here, as `LlavaProcessor` would, so the label
    mask stays aligned. Right padding (training). Each image is first made square by `image_aspect_ratio`
    (pad with the processor's mean colour, or centre-crop), and that one square feeds both the encoder's
    processor and the reconstruction target.
    """

    def __init__(
        self,
        processor: LlavaProcessor,
        template: Literal["plain", "chat"],
        max_length: int,
        rec_resolution: int | None = None,
        image_aspect_ratio: AspectRatio = "pad",
    ) -> None:
        if template not in ("plain", "chat"):
            raise ValueError(f"template must be 'plain' or 'chat', got {template!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.chat_template = PLAIN_TEMPLATE if template == "plain" else None
        self.max_length = max_length
        self.rec_resolution = rec_resolution
        self.geometry = SquareGeometry.for_processor(image_aspect_ratio, processor.image_processor.image_mean)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [self.geometry(ex["image"]) for ex in examples if ex.get("image") is not None]
        batch: dict[str, torch.Tensor] = {}
        n_image_tokens = 0
        if images:
            pixel_values = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            batch["pixel_values"] = pixel_values
            n_image_tokens = image_token_count(self.processor, *pixel_values.shape[-2:])
            if self.rec_resolution is not None:
                # Exactly the latent cache's VAE input, so cached latents and on-the-fly targets agree.
                batch["rec_pixels"] = torch.stack([vae_input(im, self.rec_resolution) for im in images])
            latents = [ex.get("latent") for ex in examples if ex.get("image") is not None]
            if all(latent is not None for latent in latents):
                batch["latents"] = torch.stack(latents)

        rows = [self._tokenize(ex, n_image_tokens) for ex in examples]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention_mask[i, : len(ids)] = 1
        batch.update(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            image_mask=torch.tensor([ex.get("image") is not None for ex in examples], dtype=torch.bool),
            sample_index=torch.tensor([int(ex["index"]) for ex in examples], dtype=torch.long),
        )
        return batch

    def _tokenize(self, example: dict[str, Any], n_image_tokens: int) -> tuple[list[int], list[int]]:
        messages = _messages(example)
        encoded = self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        placeholders = encoded["input_ids"].count(self.image_token_id)
        if placeholders != (example.get("image") is not None):
            raise DataError(
                f"example {example.get('id')!r}: {placeholders} {IMAGE_TOKEN} tokens in the rendered text for "
                f"{int(example.get('image') is not None)} image; dsvlm supports one image per example"
            )
        ids: list[int] = []
        labels: list[int] = []
        for token, in_answer in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True):
            if token == self.image_token_id:
                ids.extend([token] * n_image_tokens)
                labels.extend([IGNORE_INDEX] * n_image_tokens)
            else:
                ids.append(token)
                labels.append(token if in_answer else IGNORE_INDEX)
        if self.image_token_id in ids[self.max_length :]:
            raise DataError(
                f"example {example.get('id')!r}: max_length {self.max_length} cuts through the image's "
                f"{n_image_tokens} tokens; raise data.max_length"
            )
        return ids[: self.max_length], labels[: self.max_length]


def _messages(example: dict[str, Any]) -> list[dict[str, str]]:
    """LLaVA `conversations` as chat messages, with the image placeholder where the model expects it."""
    try:
        messages = [{"role": _ROLES[turn["from"]], "content": turn["value"]} for turn in example["conversations"]]
    except KeyError as exc:
        raise DataError(f"example {example.get('id')!r}: bad conversation turn ({exc} missing or unknown)") from exc
    has_image = example.get("image") is not None
    placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if not has_image and placeholders:
        raise DataError(f"example {example.get('id')!r}: text holds {IMAGE_TOKEN} but the example has no image")
    if has_image and placeholders == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise DataError(f"example {example.get('id')!r}: an image but no human turn to attach it to")
        first_user["content"] = f"{IMAGE_TOKEN}\n{first_user['content']}"
    return messages
