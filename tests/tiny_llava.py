"""A tiny LLaVA trained a little, for evaluation tests: not random, so its answers depend on the image and
the question the way a real model's do (ties and near-ties of a random model would hide batch effects)."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import tiny_vlm

from dsvlm.data.synthetic import SyntheticConfig, generate_synthetic, mmbench_prompt
from dsvlm.recipe import load_recipe


def train_tiny_llava(out: Path, steps: int = 120, batch: int = 32, seed: int = 0) -> Path:
    """The tiny-synthetic recipe's LLaVA, trained `steps` steps on synthetic multiple-choice items (answer
    letter + eos, loss on the answer only, lr 3e-4: see shared/docs/miniature.md), saved to `out`."""
    import datasets

    model, processor = tiny_vlm(load_recipe("tiny-synthetic").model, seed=seed)
    eval_file = generate_synthetic(
        out.parent / f"{out.name}-train-data",
        SyntheticConfig(
            n_align=1, n_instruct=1, n_eval=steps * batch // 4, seed=seed + 1, question_types=("colour", "count")
        ),
    )["eval"]
    rows = datasets.load_dataset("parquet", data_files=str(eval_file), split="train")
    tokenizer = processor.tokenizer
    texts, images = [], []
    for row in rows:
        options = {letter: row[letter] for letter in "ABCD" if row[letter]}
        prompt = processor.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": mmbench_prompt(row["question"], options)}],
                }
            ],
            add_generation_prompt=True,
            tokenize=False,
        )
        texts.append((prompt, row["answer"] + tokenizer.eos_token))
        images.append(row["image"].convert("RGB"))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    tokenizer.padding_side = "right"
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(texts), (batch,), generator=generator).tolist()
        prompts = [texts[i][0] for i in picks]
        answers = [tokenizer(texts[i][1], add_special_tokens=False)["input_ids"] for i in picks]
        inputs = processor(
            text=[p + texts[i][1] for p, i in zip(prompts, picks, strict=True)],
            images=[images[i] for i in picks],
            padding=True,
            add_special_tokens=False,
            return_tensors="pt",
        )
        labels = torch.full_like(inputs["input_ids"], -100)
        for r, answer in enumerate(answers):
            end = int(inputs["attention_mask"][r].sum())
            labels[r, end - len(answer) : end] = torch.tensor(answer)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    tokenizer.padding_side = "left"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


TASK = "batching"
GREEDY = {"until": ["ASSISTANT:"], "max_new_tokens": 6, "temperature": 0, "do_sample": False}


def mixed_requests(folder: Path, n_images: int = 240, n_text: int = 60, seed: int = 7) -> tuple[list, dict]:
    """lmms-eval `generate_until` requests over synthetic items of mixed prompt lengths (every question
    type, a hint of 0-12 words) and text-only items (no image), plus the task dict the model class reads
    docs from: `lm.task_dict = task_dict`."""
    import random

    import datasets
    from lmms_eval.api.instance import Instance

    from dsvlm.data.synthetic import synthetic_vocabulary

    eval_file = generate_synthetic(folder, SyntheticConfig(n_align=1, n_instruct=1, n_eval=n_images, seed=seed))["eval"]
    rows = list(datasets.load_dataset("parquet", data_files=str(eval_file), split="train"))
    rows += [{**row, "image": None} for row in rows[:n_text]]
    rng = random.Random(seed)
    words = synthetic_vocabulary()
    docs, requests = [], []
    for doc_id, row in enumerate(rows):
        options = {letter: row[letter] for letter in "ABCD" if row[letter]}
        hint = " ".join(rng.choices(words, k=rng.randint(0, 12))) or None
        docs.append(row)
        requests.append(
            Instance(
                request_type="generate_until",
                arguments=(mmbench_prompt(row["question"], options, hint), dict(GREEDY), _visual, doc_id, TASK, "test"),
                idx=0,
                metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
            )
        )
    return requests, {TASK: {"test": docs}}


def _visual(doc: dict) -> list:
    return [] if doc["image"] is None else [doc["image"].convert("RGB")]
