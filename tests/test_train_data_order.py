"""The data order of training: a new permutation every epoch, and a resume continues the same order."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.utils.data import DataLoader

from dsvlm.train.loop import EpochPermutation, epoch_batches

SIZE, BATCH = 12, 2
STEPS_PER_EPOCH = SIZE // BATCH


def make_loader(seed: int = 0) -> tuple[Accelerator, DataLoader, EpochPermutation]:
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True)
    sampler = EpochPermutation(SIZE, seed)
    loader = DataLoader(list(range(SIZE)), batch_size=BATCH, sampler=sampler, drop_last=True)
    return accelerator, accelerator.prepare(loader), sampler


def run(start_step: int, total: int) -> list[list[int]]:
    """The batches of steps start_step+1..total, driven as the training loop drives them (a fresh loader:
    what a process resuming from a checkpoint at `start_step` has)."""
    accelerator, loader, sampler = make_loader()
    seen, step = [], start_step
    while step < total:
        epoch, within = divmod(step, STEPS_PER_EPOCH)
        batches = epoch_batches(accelerator, loader, sampler, epoch, within)
        for _ in range(STEPS_PER_EPOCH - within):  # the loop never exhausts the iterator
            seen.append(next(batches).tolist())
            step += 1
            if step >= total:
                break
    return seen


def test_every_epoch_has_its_own_order_and_each_is_a_permutation():
    seen = run(0, 3 * STEPS_PER_EPOCH)
    epochs = [sum(seen[e * STEPS_PER_EPOCH:(e + 1) * STEPS_PER_EPOCH], []) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(SIZE))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


def test_a_resume_inside_the_second_epoch_continues_its_order():
    total = 2 * STEPS_PER_EPOCH + 2
    uninterrupted = run(0, total)
    resume_at = STEPS_PER_EPOCH + 2  # inside epoch 1
    assert run(resume_at, total) == uninterrupted[resume_at:]


def test_the_order_is_a_function_of_seed_and_epoch_only():
    a, b = EpochPermutation(SIZE, 3), EpochPermutation(SIZE, 3)
    b.set_epoch(1)
    b.set_epoch(0)
    assert list(a) == list(b)
    assert torch.equal(torch.tensor(list(a)).sort().values, torch.arange(SIZE))
