"""Two-stage training under accelerate (single process, DDP; FSDP/DeepSpeed through accelerate configs).

Loss normalisation is global: the text loss of an optimizer step is the summed token loss over all
micro-batches and processes divided by their total label-token count (likewise the reconstruction loss
per image), so one process with accumulation and N processes give the same gradient. Diffusion noise
is seeded per sample, so the result does not depend on how a batch is sharded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from accelerate import (
    Accelerator,
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    FullyShardedDataParallelPlugin,
    PartialState,
)
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin, DistributedType
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader, Sampler, Subset
from transformers import get_scheduler

from dsvlm.console import progress_bar
from dsvlm.data.dataset import PreparedSplit, fixed_subset
from dsvlm.data.geometry import SquareGeometry
from dsvlm.data.latents import LatentCache
from dsvlm.data.prepared import PreparedDataset
from dsvlm.data.synthetic import synthetic_vocabulary
from dsvlm.errors import DsvlmError, RunFailure
from dsvlm.io import atomic_dir, atomic_write_json, atomic_write_text
from dsvlm.model.collate import Collator
from dsvlm.model.dsvlm import DSVLM, build_model, save_model
from dsvlm.model.freeze import freeze_for_stage
from dsvlm.model.lora import lora_parameters
from dsvlm.model.precision import hold_frozen_vlm_weights
from dsvlm.model.supervision.branch import TIMESTEP_BUCKETS, timestep_buckets
from dsvlm.model.supervision.vae import vae_fingerprint
from dsvlm.outputs import writer_lock
from dsvlm.plots import image_grid, plot_losses, read_metrics
from dsvlm.recipe.load import dump_recipe
from dsvlm.recipe.schema import Recipe, StageConfig
from dsvlm.rundir import STAGE_INFO, RunDir, environment, is_final, resolve_init
from dsvlm.train import checkpoint
from dsvlm.train.collective import decided_on_main
from dsvlm.train.throughput import BranchFlops, ModelFlops, peak_tflops, throughput_fields
from dsvlm.train.tracking import check_tensorboard, finish_trackers, scalars, tensorboard_dir

log = logging.getLogger(__name__)
PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class TrainOptions:
    stages: list[str] | None = None  # None = every stage of the recipe, in order
    init: Path | None = None  # start the first selected stage from this stage output / run
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


class EpochPermutation(Sampler[int]):
    """A seeded permutation per epoch: the data order is a function of (seed, epoch) only."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class LengthGroupedPermutation(EpochPermutation):
    """LLaVA's `group_by_modality_length`, per (seed, epoch): image and text-only records are shuffled apart,
    cut into mega-batches of `group_size` (one global batch: per-device batch x processes x accumulation, the
    records of one optimizer step) sorted longest first, so a step pads little and never mixes modalities.
    The mega-batches come in shuffled order; the remainders of both modalities form the epoch's tail."""

    def __init__(self, lengths: list[int], has_image: list[bool], seed: int, group_size: int) -> None:
        super().__init__(len(lengths), seed)
        self.lengths, self.has_image, self.group_size = lengths, has_image, group_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        longest_first = {"key": self.lengths.__getitem__, "reverse": True}
        groups: list[list[int]] = []
        remainder: list[int] = []
        for image in (True, False):
            members = [i for i in range(self.size) if self.has_image[i] == image]
            shuffled = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
            full = len(shuffled) - len(shuffled) % self.group_size
            groups += [
                sorted(shuffled[start : start + self.group_size], **longest_first)
                for start in range(0, full, self.group_size)
            ]
            remainder += shuffled[full:]
        order = torch.randperm(len(groups), generator=generator).tolist()
        return iter([i for g in order for i in groups[g]] + sorted(remainder, **longest_first))


def epoch_sampler(split: PreparedSplit | Subset, seed: int, group_by_length: bool, group_size: int) -> EpochPermutation:
    """The training sampler: a plain permutation, or grouped by modality and length (`group_by_length` of the
    stage or of `data`)."""
    if not group_by_length:
        return EpochPermutation(len(split), seed)
    base, indices = (split.dataset, split.indices) if isinstance(split, Subset) else (split, range(len(split)))
    selected = list(indices)
    return LengthGroupedPermutation(
        base.lengths[selected].tolist(), base.has_image[selected].tolist(), seed, group_size
    )


def epoch_batches(
    accelerator: Accelerator, loader: DataLoader, sampler: EpochPermutation, epoch: int, skip: int
) -> Iterator[dict]:
    """This process's batches of `epoch`, the first `skip` left out (a resume inside the epoch).

    accelerate's prepared loader re-seeds the sampler with its own iteration counter on every `iter()`, and
    that counter only advances when an iterator runs to exhaustion (ours stop at the epoch's last full
    step), while `skip_first_batches` copies the counter into a new loader. Setting the epoch on the loader
    itself keeps both on `epoch`; our sampler gets it directly too, as accelerate's `set_epoch` does not
    reach it through every wrapper (e.g. skip + shard under several processes)."""
    sampler.set_epoch(epoch)
    loader.set_epoch(epoch)
    return iter(accelerator.skip_first_batches(loader, skip) if skip else loader)


def _claim_run_dir(
    recipe: Recipe, names: list[str], options: TrainOptions, held: contextlib.ExitStack
) -> tuple[RunDir, Path | None]:
    """The run directory taken (its writer lock held in `held`), checked and made, and `--init` resolved before
    `--overwrite` removes anything. Run by the main process only (see `train`)."""
    root = Path(recipe.run.output_dir)
    held.enter_context(writer_lock(root))
    init = resolve_init(options.init) if options.init else None
    if init is not None and options.overwrite:
        doomed = [n for n in names if init.resolve().is_relative_to((root / n).resolve())]
        if doomed:
            raise DsvlmError(
                f"--init {options.init} is the output of stage {doomed[0]!r}, which --overwrite would delete "
                "first; copy it out of the run and pass the copy"
            )
    return RunDir.open(root, recipe, names, options.resume, options.overwrite), init


def train(recipe: Recipe, options: TrainOptions) -> Path:
    """Run the selected stages in order; each starts from the previous one's output. Returns the last output."""
    names = options.stages or [s.name for s in recipe.stages]
    unknown = [n for n in names if n not in {s.name for s in recipe.stages}]
    if unknown:
        raise DsvlmError(f"stage {unknown[0]!r} is not in the recipe (stages: {[s.name for s in recipe.stages]})")
    stages = [s for s in recipe.stages if s.name in names]
    for stage in stages:  # fail on missing data before any model is built
        _check_data(recipe, stage)
    check_tensorboard(recipe)
    state = PartialState(cpu=_cpu_only())
    for stage in stages:  # the world size is known now: refuse a batch layout it cannot make, before any work
        _check_batch_layout(stage, state.num_processes)
    with contextlib.ExitStack() as held:
        # The main process alone claims the run directory, and the others share its verdict: checking it on
        # every process would race with its making (a folder not empty, its run marker not yet written).
        run, init = decided_on_main(lambda: _claim_run_dir(recipe, names, options, held))
        output = run.root
        for stage in stages:
            if init is None:
                init = _previous_output(recipe, run, stage)
            output = run.final_dir(stage.name)
            if options.resume and is_final(output):
                log.info("stage %s already finished: %s", stage.name, output)
            else:
                output = run_stage(recipe, stage, run, init, options)
            init = output
    return output


def _launched_with_deepspeed() -> bool:
    """`accelerate launch` with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED in every process."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _check_batch_layout(stage: StageConfig, world: int) -> None:
    """Refuse what the launch cannot run, before any model loads. Under DeepSpeed the engine steps the optimizer
    inside `backward` at its own accumulation boundary and divides the loss by its accumulation count again, while
    dsvlm accumulates explicitly (no_sync, a loss normalised over the whole step): accumulation must be 1 there."""
    accumulation = stage.accumulation_steps(world)
    if _launched_with_deepspeed() and accumulation > 1:
        raise DsvlmError(
            f"stage {stage.name}: under DeepSpeed dsvlm needs gradient accumulation 1 (it would be "
            f"{accumulation}); set per_device_batch_size = global_batch_size / {world}"
        )


def _check_data(recipe: Recipe, stage: StageConfig) -> None:
    path = Path(stage.dataset or recipe.data.dataset)
    dataset = PreparedDataset(path)
    if stage.split_name not in dataset.splits:
        raise DsvlmError(
            f"stage {stage.name}: the prepared dataset {path} has no split {stage.split_name!r} "
            f"(it has {', '.join(dataset.splits)}); set stages.N.split or prepare that split"
        )
    records = dataset.manifest["splits"][stage.split_name]["records"]
    if stage.max_records is not None and stage.max_records > records:
        raise DsvlmError(
            f"stage {stage.name}: max_records {stage.max_records} exceeds the {records} records of "
            f"split {stage.split_name!r} in {path}"
        )


def _previous_output(recipe: Recipe, run: RunDir, stage: StageConfig) -> Path | None:
    """A later stage starts from the run's earlier stage when that one finished."""
    order = [s.name for s in recipe.stages]
    for earlier in reversed(order[: order.index(stage.name)]):
        if is_final(run.final_dir(earlier)):
            return run.final_dir(earlier)
    if order.index(stage.name) > 0:
        log.warning("stage %s starts from the base weights: no earlier stage output in %s", stage.name, run.root)
    return None


def _cpu_only() -> bool:
    """Without an accelerator, multi-process runs need accelerate's explicit CPU mode (gloo): otherwise each
    process would silently train alone on all the data."""
    return not torch.cuda.is_available()


def _accelerator(stage: StageConfig, tensorboard: Path | None = None) -> Accelerator:
    AcceleratorState._reset_state()  # each stage may use its own precision
    cpu_fsdp = _cpu_only() and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    cpu_deepspeed = _cpu_only() and _launched_with_deepspeed()
    accelerator = Accelerator(
        cpu=_cpu_only(),
        mixed_precision=PRECISION[stage.precision],
        # Our schedule counts optimizer steps of the global batch: one scheduler step per optimizer step.
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(even_batches=True),
        # The last encoder layers feed only the diffusion branch; unused parameters are normal.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with="tensorboard" if tensorboard else None,
        project_dir=tensorboard,
    )
    if cpu_fsdp and accelerator.num_processes > 1:
        # accelerate selects FSDP on accelerators only and would silently run DDP on CPU; FSDP2 itself runs on
        # CPU (gloo), so a CPU launch with an FSDP config (tests, CI) gets the same FSDP code path as GPUs.
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does on GPUs
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launch's FSDP_* env
    if cpu_deepspeed and accelerator.num_processes > 1:
        # Likewise for DeepSpeed (its CPU accelerator communicates over gloo without oneCCL): as accelerate
        # sets it up on GPUs, from the launch's ACCELERATE_DEEPSPEED_* env.
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(PRECISION[stage.precision])
        plugin.select(_from_accelerator_state=True)
        accelerator.state.distributed_type = DistributedType.DEEPSPEED
        PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
        accelerator.state.deepspeed_plugins = plugin
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed's engine clips inside its step and ignores clip_grad_norm_: the recipe's norm goes to it.
        accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] = stage.max_grad_norm or 0.0
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise DsvlmError(
            f"launched {launched} processes but accelerate set up {accelerator.num_processes}; "
            "check the accelerate config (on CPU: `accelerate launch --multi_gpu --cpu ...`)"
        )
    return accelerator


def _hold_frozen_in_stage_precision(model: DSVLM, stage: StageConfig, accelerator: Accelerator) -> None:
    """Under bf16/fp16, frozen Linear/Conv weights are held in 16 bits (dsvlm.model.precision): autocast computes
    them in 16 bits anyway, so results are unchanged in less memory. The frozen pretrained UNet/VAE in the stage's
    type; the VLM's only where lossless, and saved as fp32. Not under FSDP (its mixed-precision policy owns
    parameter dtypes) nor DeepSpeed (which casts the whole model)."""
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if stage.precision == "fp32" or sharded:
        return
    dtype = torch.bfloat16 if stage.precision == "bf16" else torch.float16
    held = {"VLM": hold_frozen_vlm_weights(model.vlm, dtype)}
    if model.supervision is not None:
        held["UNet/VAE"] = model.supervision.hold_frozen_in(dtype)
    for part, cast in held.items():
        if cast:
            log.info(
                "frozen %s weights held in 16 bits: %.1f M parameters, %.2f GB saved", part, cast / 1e6, cast * 2 / 1e9
            )


def _latent_cache(recipe: Recipe, model: DSVLM, dataset_dir: Path, geometry: SquareGeometry) -> LatentCache | None:
    branch = model.supervision
    if branch is None or branch.vae is None or not recipe.data.use_latent_cache:
        return None
    if not (dataset_dir / "latents").is_dir():
        log.info("no latent cache in %s: the VAE encoder runs every step", dataset_dir)
        return None
    return LatentCache.open(dataset_dir, vae_fingerprint(branch.vae), recipe.supervision.resolution, geometry)


def noise_seeds(seed: int, step: int, sample_index: torch.Tensor) -> torch.Tensor:
    """Per-sample diffusion seeds from (run seed, step, sample), independent of device and batch layout."""
    return (sample_index.long() + (seed * 1_000_003 + step) * 10_000_019) % (2**62)


def run_stage(recipe: Recipe, stage: StageConfig, run: RunDir, init: Path | None, options: TrainOptions) -> Path:
    tensorboard = tensorboard_dir(recipe, run.root)
    accelerator = _accelerator(stage, tensorboard)
    world = accelerator.num_processes
    accum = stage.accumulation_steps(world)
    supervise = recipe.supervision.enabled and stage.supervision
    torch.manual_seed(recipe.run.seed)

    try:
        model = build_model(recipe, init=init, words=synthetic_vocabulary(), llm_lora=stage.llm_lora)
    except (OSError, ValueError, KeyError) as exc:  # a missing, truncated or mismatched stage output
        raise DsvlmError(f"stage {stage.name}: {init or 'the base model'} does not load: {exc}") from exc
    freeze_for_stage(model, stage.train)
    if stage.gradient_checkpointing:
        model.vlm.activation_checkpointing_enable()
    model_flops, branch_flops = ModelFlops.of(model), BranchFlops(model)
    dataset_dir = Path(stage.dataset or recipe.data.dataset)
    collator = Collator(
        model.processor,
        stage.template_name,
        recipe.data.max_length,
        rec_resolution=recipe.supervision.resolution if supervise else None,
        image_aspect_ratio=recipe.model.image_aspect_ratio,
    )
    latents = _latent_cache(recipe, model, dataset_dir, collator.geometry)
    _hold_frozen_in_stage_precision(model, stage, accelerator)  # after the cache's VAE fingerprint
    with accelerator.main_process_first():  # one process makes the split's Arrow copy if it is missing
        split = PreparedSplit(dataset_dir, stage.split_name, latents=latents)
    if stage.max_records is not None:
        split = fixed_subset(split, stage.max_records)  # the same records for every run seed
    grouped = recipe.data.group_by_length if stage.group_by_length is None else stage.group_by_length
    sampler = epoch_sampler(split, recipe.run.seed, grouped, stage.global_batch_size)
    workers = recipe.data.num_workers
    # Persistent workers: started once per stage, not once per epoch; pinned batches copy to the GPU faster.
    # Its own generator: each iter() draws the workers' base seed, which from the global RNG would shift the
    # dropout masks (LoRA's) of a resumed run against an uninterrupted one.
    loader = DataLoader(
        split,
        batch_size=stage.per_device_batch_size,
        sampler=sampler,
        collate_fn=collator,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(recipe.run.seed),
    )
    steps_per_epoch = len(split) // stage.global_batch_size
    if steps_per_epoch == 0:
        raise DsvlmError(
            f"stage {stage.name}: split {stage.split_name!r} has {len(split)} records, fewer than "
            f"one global batch ({stage.global_batch_size})"
        )
    total = stage.max_steps or max(1, math.floor(stage.epochs * steps_per_epoch))

    optimizer = torch.optim.AdamW(_param_groups(model, stage), lr=stage.lr, weight_decay=stage.weight_decay)
    schedule = "constant_with_warmup" if stage.schedule == "constant" else stage.schedule
    scheduler = get_scheduler(
        schedule, optimizer, num_warmup_steps=round(stage.warmup_ratio * total), num_training_steps=total
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    trainable = [p for p in model.parameters() if p.requires_grad]
    peak = peak_tflops(recipe.run.peak_tflops, stage.precision, accelerator.device)

    stage_dir = run.stage_dir(stage.name)
    metrics_path = run.metrics_path(stage.name)
    step = 0
    if options.resume:
        state = checkpoint.load_latest(accelerator, run.checkpoints_dir(stage.name))
        step = state["step"] if state else 0
    if tensorboard:  # RUN/tensorboard/<stage>/, written by the main process
        # Resumed at `step`: TensorBoard drops what the interrupted run logged after it (it is logged again)
        purge = {"tensorboard": {"purge_step": step + 1}} if step else {}
        accelerator.init_trackers(stage.name, init_kwargs=purge)
    if accelerator.is_main_process:
        stage_dir.mkdir(parents=True, exist_ok=True)
        run.write_environment(environment(world, str(accelerator.device)))
        _truncate_metrics(metrics_path, step)
    preview = _preview_batch(split, collator, recipe) if supervise else None

    log.info(
        "stage %s: %d steps, global batch %d = %d per device x %d accumulation x %d processes",
        stage.name,
        total,
        stage.global_batch_size,
        stage.per_device_batch_size,
        accum,
        world,
    )
    started = time.perf_counter()
    with progress_bar(options.progress and accelerator.is_main_process, info=True) as progress:
        task = progress.add_task(stage.name, total=total, completed=step, info="")
        while step < total:
            epoch, within = divmod(step, steps_per_epoch)
            batches = epoch_batches(accelerator, loader, sampler, epoch, within * accum)
            for _ in range(steps_per_epoch - within):
                micro = [next(batches) for _ in range(accum)]
                tick = time.perf_counter()
                record = _optimizer_step(
                    accelerator,
                    model,
                    optimizer,
                    scheduler,
                    trainable,
                    micro,
                    stage,
                    supervise,
                    recipe.run.seed,
                    step,
                    branch_flops,
                )
                step += 1
                record.update(
                    stage=stage.name,
                    step=step,
                    epoch=round(step / steps_per_epoch, 4),
                    step_time_s=round(time.perf_counter() - tick, 4),
                    elapsed_s=round(time.perf_counter() - started, 2),
                )
                record["samples_per_s"] = round(stage.global_batch_size / record["step_time_s"], 2)
                record.update(
                    throughput_fields(
                        record["tokens"],
                        record["images"],
                        record["reconstructed"],
                        record["step_time_s"],
                        world,
                        model_flops,
                        branch_flops,
                        peak,
                    )
                )
                if accelerator.is_main_process:
                    _append_metrics(metrics_path, record, run.checkpoints_dir(stage.name))
                    accelerator.log(scalars(record), step=step)  # no-op without run.tensorboard
                    progress.update(task, completed=step, info=_progress_info(record))
                    if step % recipe.run.log_every == 0 and not options.progress:
                        log.info("%s step %d/%d %s", stage.name, step, total, _progress_info(record))
                if not math.isfinite(record["loss"]):  # the same on every process: losses are all-reduced
                    raise RunFailure(_not_finite(stage.name, step, record["loss"], run.checkpoints_dir(stage.name)))
                if supervise and recipe.run.preview_every and step % recipe.run.preview_every == 0:
                    _write_preview(accelerator, model, preview, recipe, stage_dir / "previews" / f"step-{step:07d}.png")
                if step % recipe.run.checkpoint_every == 0 and step < total:
                    checkpoint.save_checkpoint(
                        accelerator,
                        run.checkpoints_dir(stage.name),
                        step,
                        {"stage": stage.name, "total_steps": total},
                        recipe.run.keep_checkpoints,
                    )
                if step >= total:
                    break

    wall = time.perf_counter() - started
    finish_trackers(accelerator)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    # Sharded (FSDP, DeepSpeed): every rank takes part in gathering the full state dict (a collective); replicated
    # (DDP): only the main process, which saves, needs it.
    gathering = fsdp or accelerator.distributed_type == DistributedType.DEEPSPEED or accelerator.is_main_process
    full_state = accelerator.get_state_dict(model) if gathering else None
    # FSDP's ranks hold shards of one copy: nothing to compare. Replicas (DDP, ZeRO-2) must be identical.
    checksums = None if fsdp else _rank_checksums(accelerator, model)
    if checksums is not None and len(set(checksums)) > 1:
        raise RunFailure(f"stage {stage.name}: the weights of the {world} processes diverged ({checksums})")
    if supervise:
        _write_preview(accelerator, model, preview, recipe, stage_dir / "reconstructions.png")
    output = run.final_dir(stage.name)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metrics = read_metrics(metrics_path)
        plot_losses(metrics, stage_dir / "loss.png", f"{recipe.description[:60]} - stage {stage.name}")
        info = {
            "stage": stage.name,
            "steps": total,
            "wall_time_s": round(wall, 2),
            "init": str(init or ""),
            "dataset": str(dataset_dir),
            "split": stage.split_name,
            "records": len(split),
            "supervision": supervise,
            "world_size": world,
            "distributed": accelerator.distributed_type.value,
            "rank_checksums": checksums,
            "peak_memory_mb": _peak_memory_mb(accelerator),
            "last_metrics": metrics[-1] if metrics else {},
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            with atomic_dir(output, replace=True) as tmp:
                save_model(accelerator.unwrap_model(model), tmp, state_dict=full_state)
                atomic_write_text(tmp / "recipe.yaml", dump_recipe(recipe))
                atomic_write_json(tmp / STAGE_INFO, info)
        except OSError as exc:
            raise RunFailure(f"could not write the stage output {output}: {exc.strerror or exc}") from exc
        log.info("stage %s finished in %.1f s -> %s", stage.name, wall, output)
    accelerator.wait_for_everyone()
    return output


def _not_finite(stage: str, step: int, loss: float, checkpoints: Path) -> str:
    """Why the run stopped, and what is left to resume from."""
    kept = checkpoint.latest_names(checkpoints)
    left = (
        f"the last good checkpoint, {checkpoints / kept[0]}, is kept (--resume continues from it)"
        if kept
        else "no checkpoint was written before it"
    )
    return (
        f"stage {stage}: the loss at step {step} is {loss} (not finite); training stopped and no final output "
        f"was written; {left}. Lower the learning rate or enable gradient clipping (max_grad_norm)"
    )


def _param_groups(model: DSVLM, stage: StageConfig) -> list[dict[str, Any]]:
    """New modules (adapters, new K/V, routers) and the LLM's LoRA adapters may get their own learning rate."""
    new = {id(p) for p in model.supervision.new_parameters()} if model.supervision is not None else set()
    lora = {id(p) for p in lora_parameters(model.vlm)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    own_lr = new | lora
    groups = [
        {"params": [p for p in trainable if id(p) not in own_lr]},
        {"params": [p for p in trainable if id(p) in new], "lr": stage.new_module_lr or stage.lr},
        {
            "params": [p for p in trainable if id(p) in lora],
            "lr": (stage.llm_lora.lr if stage.llm_lora else None) or stage.lr,
        },
    ]
    return [g for g in groups if g["params"]]


def _optimizer_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    trainable: list,
    micro: list[dict],
    stage: StageConfig,
    supervise: bool,
    seed: int,
    step: int,
    branch_flops: BranchFlops,
) -> dict:
    """One optimizer step over `micro` (this process's micro-batches), normalised over all processes."""
    world = accelerator.num_processes
    # Per micro-batch: text tokens, reconstructed images, attended tokens, images; copied to the host once.
    per_batch = torch.stack(
        [
            torch.stack(
                [
                    (b["labels"][:, 1:] != -100).sum(),
                    _reconstructed(b["image_mask"].sum(), model, supervise),
                    b["attention_mask"].sum(),
                    b["image_mask"].sum(),
                ]
            )
            for b in micro
        ]
    ).float()
    totals = accelerator.reduce(per_batch.sum(0), reduction="sum")
    *reconstructed, text_tokens, rec_images, tokens, images = torch.cat([per_batch[:, 1], totals]).tolist()
    text_loss = torch.zeros((), device=accelerator.device)
    rec_loss = torch.zeros((), device=accelerator.device)
    rec_buckets = torch.zeros(TIMESTEP_BUCKETS, 2, device=accelerator.device)
    for i, batch in enumerate(micro):
        batch["noise_seeds"] = noise_seeds(seed, step, batch["sample_index"])
        sync = contextlib.nullcontext() if i == len(micro) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast(), branch_flops.measuring(int(reconstructed[i])):
                # DDP averages gradients over processes: scale by world size to get the global sum / count.
                out = model(
                    batch,
                    supervise=supervise,
                    text_normalizer=max(text_tokens, 1.0) / world,
                    rec_normalizer=max(rec_images, 1.0) / world,
                )
            accelerator.backward(out.loss)
        text_loss += out.text_loss.detach()
        rec_loss += out.rec_loss.detach()
        if out.rec_buckets is not None:
            rec_buckets += out.rec_buckets
        # The full-vocabulary logits (GBs at 7B shapes) must not stay alive into the next micro-batch's forward.
        del out
    norm = stage.max_grad_norm or float("inf")
    grad_norm = accelerator.clip_grad_norm_(trainable, norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # One all-reduce per step: the two losses and the per-noise-level (sum, count) pairs travel together.
    reduced = accelerator.reduce(
        torch.cat([torch.stack([text_loss, rec_loss]), rec_buckets.flatten()]), reduction="sum"
    ).tolist()
    text, rec = reduced[0] / world, reduced[1] / world
    record = {
        "loss": text + (rec * _weight(model) if supervise else 0.0),
        "text_loss": text,
        "rec_loss": rec if supervise else None,
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        "tokens": tokens,
        "images": images,
        "reconstructed": rec_images,
    }
    if supervise:
        # Mean per-image reconstruction loss by noise level, for the buckets this step drew.
        n_timesteps = len(_unwrapped(model).supervision.alphas_cumprod)
        sums = zip(reduced[2::2], reduced[3::2], strict=True)
        for (lo, hi), (total, count) in zip(timestep_buckets(n_timesteps), sums, strict=True):
            if count:
                record[f"rec_loss_t{lo}-{hi}"] = total / count
    return record


def _unwrapped(model: torch.nn.Module) -> DSVLM:
    return getattr(model, "module", model)


def _weight(model: torch.nn.Module) -> float:
    return _unwrapped(model).supervision.config.weight


def _reconstructed(images: torch.Tensor, model: torch.nn.Module, supervise: bool) -> torch.Tensor:
    """How many of a micro-batch's `images` the branch reconstructs (a device tensor: no wait for the device)."""
    if not supervise:
        return torch.zeros_like(images)
    limit = _unwrapped(model).supervision.config.reconstruct_per_batch
    return images.clamp(max=limit) if limit else images


def _preview_batch(split: PreparedSplit, collator: Collator, recipe: Recipe) -> dict:
    """The same first images of the split every time, so previews are comparable across steps."""
    examples = []
    for i in range(len(split)):
        if split[i]["image"] is not None:
            examples.append(split[i])
        if len(examples) == recipe.run.preview_images:
            break
    return collator(examples)


def _write_preview(accelerator: Accelerator, model: torch.nn.Module, batch: dict, recipe: Recipe, out: Path) -> None:
    """Every rank runs the preview forward (under FSDP each holds only shards: a rank-0-only forward would hang
    in its all-gathers); the main process writes the image."""
    batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    # The preview does not enter through the root forward, whose hook gathers the root-owned shards (embeddings,
    # connector, UNet): gather them explicitly; the sharded layers gather themselves when called.
    sharded = isinstance(model, FSDPModule)
    if sharded:
        model.unshard()
    with torch.no_grad(), accelerator.autocast():  # the stage's precision, as in training
        rows = accelerator.unwrap_model(model).reconstruct(
            batch, recipe.run.preview_images, recipe.supervision.sampler_steps
        )
    if sharded:
        model.reshard()
    if accelerator.is_main_process:
        image_grid(list(rows), out)
    accelerator.wait_for_everyone()


def _rank_checksums(accelerator: Accelerator, model: torch.nn.Module) -> list[float]:
    """A weighted parameter sum per process: replicas (DDP, DeepSpeed ZeRO-2) must hold identical weights."""
    with torch.no_grad():
        params = _unwrapped(model).parameters()
        total = sum(float((p.double() * (i % 7 + 1)).sum()) for i, p in enumerate(params))
    return accelerator.gather(torch.tensor([total], dtype=torch.float64, device=accelerator.device)).tolist()


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop metric lines past the checkpoint: they are about to be recomputed."""
    kept = [m for m in read_metrics(path) if m["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in kept))


def _append_metrics(path: Path, record: dict, checkpoints: Path) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:  # a full disk: say so, and what a later --resume will start from
        kept = checkpoint.latest_names(checkpoints)
        left = f"; --resume continues from {checkpoints / kept[0]}" if kept else ""
        raise RunFailure(f"could not write the metrics {path}: {exc.strerror or exc}{left}") from exc


def _peak_memory_mb(accelerator: Accelerator) -> float:
    if accelerator.device.type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def _progress_info(record: dict) -> str:
    parts = [f"loss {record['loss']:.4f}", f"text {record['text_loss']:.4f}"]
    if record.get("rec_loss") is not None:
        parts.append(f"rec {record['rec_loss']:.4f}")
    parts.append(f"{record['samples_per_s']:.1f} samples/s")
    return "  ".join(parts)
