"""Training-loop mechanics: a new data order every epoch, a resume continues it, micro-batch memory freed."""

from __future__ import annotations

import weakref

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
    epochs = [[i for batch in seen[e * STEPS_PER_EPOCH : (e + 1) * STEPS_PER_EPOCH] for i in batch] for e in range(3)]
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


def test_a_micro_batch_forward_does_not_keep_the_previous_logits_alive():
    """Full-vocabulary logits of micro-batch i must be freed before micro-batch i+1's forward."""
    from helpers import tiny_model
    from test_model_dsvlm import batch_for
    from test_model_fixtures import tiny_recipe

    from dsvlm.train.loop import _optimizer_step
    from dsvlm.train.throughput import BranchFlops

    recipe = tiny_recipe()
    stage = recipe.stages[0]
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True)
    model = tiny_model(recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    previous: list[weakref.ref] = []
    alive_at_forward: list[bool] = []
    model.register_forward_pre_hook(lambda *_: alive_at_forward.append(any(r() is not None for r in previous)))
    model.register_forward_hook(lambda _m, _a, out: previous.append(weakref.ref(out.logits)))
    micro = [batch_for(model, n=2) for _ in range(3)]
    branch_flops = BranchFlops(accelerator.unwrap_model(model))
    _optimizer_step(
        accelerator, model, optimizer, scheduler, list(model.parameters()), micro, stage, True, 0, 0, branch_flops
    )
    assert alive_at_forward == [False, False, False]
