"""`data.group_by_length`: LLaVA's modality-length grouping, seeded per epoch and resumable inside an epoch."""

from __future__ import annotations

import random

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


def test_training_with_group_by_length_runs(tmp_path):
    from dsvlm.recipe.load import load_recipe
    from dsvlm.train.loop import TrainOptions, train

    data = prepare_small_synthetic(tmp_path / "data", n=16)
    overrides = tiny_overrides(data, tmp_path / "run", steps=2, batch=4, **{"data.group_by_length": True})
    output = train(load_recipe("tiny-synthetic", overrides), TrainOptions(stages=["instruct"], progress=False))
    assert output.is_dir()
