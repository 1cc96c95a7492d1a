"""`data.group_by_length`: LLaVA's modality-length grouping, seeded per epoch and resumable inside an epoch."""

from __future__ import annotations

import random
from pathlib import Path

from accelerate import Accelerator
from accelerate.state import AcceleratorState
from helpers import prepare_small_synthetic, tiny_overrides
from torch.utils.data import DataLoader

from dsvlm.train.loop import LengthGroupedPermutation, epoch_batches

GROUP, BATCH = 4, 2  # a mega-batch of 4 = 2 per device x 2 accumulation
IMAGES, TEXTS = 22, 13  # remainders of both modalities: 2 + 1 records
LENGTHS = [random.Random(i).randint(3, 60) for i in range(IMAGES + TEXTS)]
HAS_IMAGE = [i < IMAGES for i in range(IMAGES + TEXTS)]
FULL_GROUPS = IMAGES // GROUP + TEXTS // GROUP


def sampler(seed: int = 0, epoch: int = 0) -> LengthGroupedPermutation:
    grouped = LengthGroupedPermutation(LENGTHS, HAS_IMAGE, seed, GROUP)
    grouped.set_epoch(epoch)
    return grouped


def test_every_epoch_is_a_permutation_of_all_records():
    for epoch in range(3):
        assert sorted(sampler(epoch=epoch)) == list(range(len(LENGTHS)))


def test_mega_batches_hold_one_modality_sorted_longest_first():
    order = list(sampler())
    for start in range(0, FULL_GROUPS * GROUP, GROUP):
        group = order[start : start + GROUP]
        assert len({HAS_IMAGE[i] for i in group}) == 1
        assert [LENGTHS[i] for i in group] == sorted((LENGTHS[i] for i in group), reverse=True)
    modalities = [HAS_IMAGE[order[start]] for start in range(0, FULL_GROUPS * GROUP, GROUP)]
    assert modalities != sorted(modalities, reverse=True)  # the mega-batches are shuffled, not images first


def test_the_order_is_a_function_of_seed_and_epoch():
    assert list(sampler(3, 1)) == list(sampler(3, 1))
    assert list(sampler(3, 0)) != list(sampler(3, 1))
    assert list(sampler(3, 0)) != list(sampler(4, 0))


def test_a_resume_skipping_k_batches_continues_the_epoch_exactly():
    def batches(skip: int) -> list[list[int]]:
        AcceleratorState._reset_state()
        accelerator = Accelerator(cpu=True)
        grouped = LengthGroupedPermutation(LENGTHS, HAS_IMAGE, 7, GROUP)
        loader = accelerator.prepare(
            DataLoader(list(range(len(LENGTHS))), batch_size=BATCH, sampler=grouped, drop_last=True)
        )
        return [b.tolist() for b in epoch_batches(accelerator, loader, grouped, 1, skip)]

    full = batches(0)
    assert [i for b in full for i in b] == list(sampler(7, 1))[: len(full) * BATCH]
    for skip in (1, 4, 5):
        assert batches(skip) == full[skip:]


def test_training_takes_its_batches_in_the_grouped_order(tmp_path):
    """The loop's steps consume the grouped order: each step's attended-token count (metrics `tokens`) is that of
    the next mega-batch of `epoch_sampler`, and differs from what the plain permutation would give."""
    from dsvlm.data.dataset import PreparedSplit
    from dsvlm.data.synthetic import synthetic_vocabulary
    from dsvlm.model.collate import Collator
    from dsvlm.model.dsvlm import build_model
    from dsvlm.plots import read_metrics
    from dsvlm.recipe.load import load_recipe
    from dsvlm.train.loop import TrainOptions, epoch_sampler, train

    data = prepare_small_synthetic(tmp_path / "data", n=32)  # 8 mega-batches of 4: the two orders differ early

    def logged_tokens(out: Path, **grouping: bool) -> list[float]:
        recipe = load_recipe("tiny-synthetic", tiny_overrides(data, out, steps=3, batch=4, **grouping))
        train(recipe, TrainOptions(stages=["instruct"], progress=False))
        return [m["tokens"] for m in read_metrics(out / "instruct" / "metrics.jsonl")]

    recipe = load_recipe("tiny-synthetic", tiny_overrides(data, tmp_path / "unused", batch=4))
    stage = recipe.stage("instruct")
    split = PreparedSplit(data, stage.split_name)
    processor = build_model(recipe, words=synthetic_vocabulary()).processor
    collator = Collator(
        processor, stage.template_name, recipe.data.max_length, image_aspect_ratio=recipe.model.image_aspect_ratio
    )

    def tokens_per_step(grouped: bool) -> list[float]:
        order = list(epoch_sampler(split, recipe.run.seed, grouped, stage.global_batch_size))
        batches = [order[k * 4 : (k + 1) * 4] for k in range(3)]
        return [float(collator([split[i] for i in batch])["attention_mask"].sum()) for batch in batches]

    grouped, plain = tokens_per_step(grouped=True), tokens_per_step(grouped=False)
    assert grouped != plain
    assert logged_tokens(tmp_path / "data-level", **{"data.group_by_length": True}) == grouped
    # A stage's own field overrides data's: the paper recipes group stage 2 only, as LLaVA-1.5 does
    assert logged_tokens(tmp_path / "stage-level", **{"stages.1.group_by_length": True}) == grouped
    stage_off = {"data.group_by_length": True, "stages.1.group_by_length": False}
    assert logged_tokens(tmp_path / "stage-off", **stage_off) == plain
