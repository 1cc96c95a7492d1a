"""The dsvlm model in lmms-eval: a stripped dsvlm checkpoint (a plain transformers LLaVA), batched.

lmms-eval's own `llava_hf` loads the same directories but generates one request at a time; this class
left-pads batches, formats prompts with the checkpoint's own chat template (the one training used) and
implements `loglikelihood` for multiple-choice tasks.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm
from transformers import AutoProcessor, LlavaForConditionalGeneration

from dsvlm.data.geometry import SquareGeometry
from dsvlm.errors import DsvlmError
from dsvlm.evaluation.compat import LogProb, apply_workarounds
from dsvlm.evaluation.model_dir import resolve_device, resolve_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DsvlmLlava(lmms):
    """lmms-eval model `dsvlm`: `--model dsvlm --model_args pretrained=DIR[,device=cuda,dtype=bfloat16]`
    (default "auto": a GPU in bfloat16 when present, else the CPU in float32).

    A simple (not chat) model: lmms-eval hands it the task's prompt text and images, exactly what it hands
    `llava_hf`, so the two can be compared answer for answer.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 8,
        device: str = "auto",
        dtype: str = "auto",
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise DsvlmError(
                f"unknown dsvlm model args: {', '.join(sorted(unknown))}; known: pretrained, batch_size, device, dtype"
            )
        # Covers `lmms-eval eval --model dsvlm` too, where dsvlm's runner is not involved.
        apply_workarounds()
        try:
            self._batch_size = int(batch_size)
        except ValueError:
            raise DsvlmError(f"batch_size must be a positive integer, got {batch_size!r}") from None
        if self._batch_size < 1:
            raise DsvlmError(f"batch_size must be a positive integer, got {batch_size!r}")
        device, dtype = resolve_device(device, dtype)
        if dtype not in DTYPES:
            raise DsvlmError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        path = resolve_model(pretrained)
        self._device = torch.device(device)
        self.model = LlavaForConditionalGeneration.from_pretrained(path, dtype=DTYPES[dtype]).to(self._device)
        self.model.eval()
        self.processor = AutoProcessor.from_pretrained(path)
        # dsvlm records how training squared its images; other LLaVA checkpoints keep their processor's way.
        aspect = getattr(self.model.config, "image_aspect_ratio", None)
        mean = self.processor.image_processor.image_mean
        self.square = SquareGeometry.for_processor(aspect, mean) if aspect in ("pad", "crop") else None
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation continues at the right edge of every row
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise DsvlmError(f"{path}: the tokenizer has no eos token (it must be the chat turn terminator)")
        configured = self.model.generation_config.eos_token_id
        configured = configured if isinstance(configured, list) else [configured]
        self.eos_ids = list(dict.fromkeys([eos, *(i for i in configured if i is not None)]))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled, if a task asks) generation in left-padded batches, cut at `until`."""
        outputs = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="dsvlm generate", disable=self.rank != 0)
        for batch in self._batches(requests, group=lambda args: _kwargs_key(args[1])):
            gen_kwargs = dict(requests[batch[0]].args[1])
            prompts, images = [], []
            for i in batch:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
                prompts.append(self._prompt(context, len(visuals)))
                images.extend(visuals)
            inputs = self._encode(prompts, images)
            with torch.inference_mode():
                tokens = self.model.generate(**inputs, **self._generation_args(gen_kwargs))
            texts = self.tokenizer.batch_decode(tokens[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            until = gen_kwargs.get("until") or []
            for i, text in zip(batch, texts, strict=True):
                outputs[i] = _cut(text, [until] if isinstance(until, str) else until)
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), outputs[i])
            bar.update(len(batch))
        bar.close()
        return outputs

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding would produce it), as lm-eval's API
        defines them: the log-probabilities of the continuation's tokens given the context (images
        expanded), summed. (lmms-eval 0.7.3's `llava_hf` returns a mean loss over a span that also covers
        the end of the prompt.) The sum is tagged `LogProb` so that lmms-eval 0.7.3, which picks the
        answer by argmin, scores it right (see `compat.score_logprobs_by_argmax`).
        """
        results: list[tuple[float, bool]] = [(LogProb(0.0), True)] * len(requests)
        bar = tqdm(total=len(requests), desc="dsvlm loglikelihood", disable=self.rank != 0)
        for batch in self._batches(requests, group=lambda args: ""):
            rows, cont_lens, pixel_values = [], [], []
            for i in batch:
                context, continuation, doc_to_visual, doc_id, task, split = requests[i].args
                doc = self.task_dict[task][split][doc_id]
                if not isinstance(continuation, str):
                    continuation = continuation(doc)
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
                encoded = self._encode([self._prompt(context, len(visuals))], visuals)
                # Tokenised apart so the context/continuation boundary never moves inside a token.
                cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
                rows.append(encoded["input_ids"][0].tolist() + list(cont))
                cont_lens.append(len(cont))
                if "pixel_values" in encoded:
                    pixel_values.append(encoded["pixel_values"])
            input_ids, attention_mask = _left_pad(rows, self.pad_id)
            # Left padding: positions must count real tokens only, as they would without padding.
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            keep = max(cont_lens) + 1
            with torch.inference_mode():
                logits = self.model(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    position_ids=position_ids.to(self.device),
                    pixel_values=torch.cat(pixel_values).to(self.device, self.model.dtype) if pixel_values else None,
                    logits_to_keep=keep,
                ).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1).cpu()
            for r, (i, n) in enumerate(zip(batch, cont_lens, strict=True)):
                if n == 0:
                    continue
                target = input_ids[r, -n:]
                scores = logprobs[r, keep - 1 - n :]
                token_logprobs = scores.gather(-1, target[:, None]).squeeze(-1)
                results[i] = (LogProb(token_logprobs.sum()), bool((scores.argmax(-1) == target).all()))
            bar.update(len(batch))
        bar.close()
        return results

    def clean(self) -> None:
        """Release the model after an evaluation. lmms-eval's own `clean` runs two full garbage collections
        (about 0.5 s with a task's datasets loaded, a third of a small evaluation's end-to-end time); the
        model is freed by reference counting, and only a GPU has memory the next model needs back at once."""
        del self.model
        if self._device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("dsvlm does not run multi-round generation tasks")

    def _batches(self, requests: Sequence[Instance], group: Callable[[tuple], str]) -> Iterator[list[int]]:
        """Indices in batches of `batch_size`: same `group` key, longest prompts first (fewer pad tokens)."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(group(request.args), []).append(i)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                yield indices[start : start + self.batch_size]

    def _visuals(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int) -> list[Image.Image]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
        visuals = list(visuals or [])
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise DsvlmError(f"task {task}: dsvlm evaluates image tasks only, got a {type(visual).__name__}")
        return visuals

    def _prompt(self, context: str, n_images: int) -> str:
        """One user turn in the checkpoint's chat template: the images first, then the task's text."""
        if n_images and self.processor.image_token not in context:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
        else:
            content = [{"type": "text", "text": context}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def _encode(self, prompts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        # The rendered template already holds its special tokens (BOS included, where the format has one);
        # training tokenizes it the same way. (`llava_hf` lets the tokenizer add a second BOS.)
        if self.square is not None:
            images = [self.square(image) for image in images]
        inputs = self.processor(
            text=prompts, images=images or None, padding=True, add_special_tokens=False, return_tensors="pt"
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _generation_args(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        args: dict[str, Any] = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or 1024),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": temperature > 0,
            "eos_token_id": self.eos_ids,
            "pad_token_id": self.pad_id,
        }
        if temperature > 0:
            args.update(temperature=temperature, top_p=float(gen_kwargs.get("top_p") or 1.0))
        return args


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one [B, width] batch aligned on the right: input_ids (padded with `pad_id`) and the
    attention mask."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, width - len(row) :] = torch.tensor(row)
        attention_mask[r, width - len(row) :] = 1
    return input_ids, attention_mask


def _kwargs_key(gen_kwargs: dict[str, Any]) -> str:
    return json.dumps(gen_kwargs, sort_keys=True, default=str)


def _cut(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest stop string."""
    cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:cut]
