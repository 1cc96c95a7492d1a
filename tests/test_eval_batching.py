"""Batch invariance of dsvlm's lmms-eval class: left padding, attention masks, position ids and the
image-token expansion give a trained model the same greedy answers and first-token logits at batch 8 as at
batch 1, over a few hundred items of mixed prompt lengths, text-only items among them (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_llava import mixed_requests

from dsvlm.evaluation.lmms_model import DsvlmLlava


def answers_and_first_logits(model_dir: Path, requests: list, task_dict: dict, batch_size: int):
    """The class's `generate_until` answers and, per request, the logits of its first generated token
    (recorded from the model's own `generate` call, batch by batch)."""
    lm = DsvlmLlava(pretrained=str(model_dir), batch_size=batch_size)
    lm.task_dict = task_dict
    generate = lm.model.generate
    first_logits: list[torch.Tensor] = []

    def recording_generate(**kwargs):
        out = generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        first_logits.append(out.logits[0].float())
        return out.sequences

    lm.model.generate = recording_generate
    answers = lm.generate_until(requests)
    # The class's batch order (longest prompts first), to give each recorded row back to its request.
    batches = list(lm._batches(requests, group=lambda args: ""))
    assert len(batches) == len(first_logits)
    logits = torch.empty(len(requests), first_logits[0].shape[-1])
    for batch, rows in zip(batches, first_logits, strict=True):
        logits[batch] = rows
    return answers, logits


@pytest.fixture(scope="module")
def requests(tmp_path_factory) -> tuple[list, dict]:
    return mixed_requests(tmp_path_factory.mktemp("batching"))


@pytest.mark.slow  # trains the shared tiny model (~30 s) and decodes 300 items twice
def test_batch_8_answers_and_logits_equal_batch_1(trained_tiny_model, requests):
    items, task_dict = requests
    assert len(items) >= 300
    assert sum(doc["image"] is None for doc in task_dict["batching"]["test"]) >= 50
    lengths = {len(item.args[0]) for item in items}
    assert max(lengths) - min(lengths) > 40  # mixed prompt lengths: left padding is exercised

    one, logits_1 = answers_and_first_logits(trained_tiny_model, items, task_dict, 1)
    eight, logits_8 = answers_and_first_logits(trained_tiny_model, items, task_dict, 8)
    agreement = sum(a == b for a, b in zip(one, eight, strict=True)) / len(items)
    print(f"greedy answers, batch 8 vs batch 1: {agreement:.2%} of {len(items)} items agree")
    assert agreement >= 0.995
    assert len(set(one)) > 1  # a trained model: answers depend on the item
    print(f"first-token logits: max |batch 8 - batch 1| = {(logits_8 - logits_1).abs().max():.2e}")
    torch.testing.assert_close(logits_8, logits_1, rtol=1e-4, atol=1e-4)

    # Trained, not random: image questions are answered better than chance (4 options).
    docs = task_dict["batching"]["test"]
    with_image = [i for i, doc in enumerate(docs) if doc["image"] is not None]
    accuracy = sum(one[i].strip().startswith(docs[i]["answer"]) for i in with_image) / len(with_image)
    print(f"accuracy on image items: {accuracy:.2%}")
    assert accuracy > 0.3
