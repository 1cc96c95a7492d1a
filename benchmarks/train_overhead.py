"""Training overhead of diffusion supervision: optimizer-step time and peak memory with vs without the branch.

    .venv/bin/python benchmarks/train_overhead.py [--setups tiny,proportional,latent] [--repeats N] \
        [--warmup 3] [--memory-steps 2 | --no-memory] [--data DIR] [--threads N] [--json FILE]

Setups, each a variant of the `tiny-synthetic` recipe (instruct stage, all modules trained):
- tiny: the recipe as it is (pixel-space UNet, 8 of 32 images reconstructed), and all 32 reconstructed;
- proportional: a bigger LLM and a frozen UNet sized so that LLM forward FLOPs / UNet forward FLOPs per
  sample is close to LLaVA-1.5-7B vs SD 1.5 at 256 px (the paper's setting), every image reconstructed;
- latent: a small inline VAE (latent diffusion); VAE encode every step vs the latent cache.
Every setup has a text-only arm (`supervision.enabled=false`, same weights) as the baseline.

A step is what the trainer's optimizer step does: forward (with per-sample noise seeds), backward, gradient
clipping, AdamW step, zero_grad. Batches come from a prepared synthetic set through the real Collator and are
collated before timing. Arms live in one process, are warmed up, then run round-robin (ABBA order); the table
gives medians. FLOPs are counted with torch's FlopCounterMode (math attention kernel, so attention counts).
Peak memory: a fresh process per arm (glibc `MALLOC_MMAP_THRESHOLD_=65536`, so freed tensors leave the
RSS) samples its RSS every millisecond during `--memory-steps` steps; the increase is over the RSS with model,
optimizer and batches built, so it holds gradients, AdamW state and activations.
The "paper setting" table counts FLOPs of the real-size models on the meta device (no compute, no weights).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import (
    RssPeak,
    command_line,
    loadavg,
    machine,
    median,
    prepare_synthetic,
    ratio_spread,
    round_robin,
    stderr_console,
    write_report,
)
from _paper_shapes import CLIP_L14_336, SD15_UNET, SD15_VAE, VICUNA_7B
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dsvlm.data.dataset import PreparedSplit
from dsvlm.data.latents import LatentCache, build_latent_cache
from dsvlm.data.synthetic import synthetic_vocabulary
from dsvlm.diffusion.pretrain import PretrainOptions, unet_config
from dsvlm.model.collate import Collator
from dsvlm.model.dsvlm import build_model
from dsvlm.model.freeze import freeze_for_stage
from dsvlm.model.supervision.components import load_vae
from dsvlm.model.supervision.vae import vae_fingerprint
from dsvlm.model.vlm import image_geometry
from dsvlm.recipe import Recipe, load_recipe
from dsvlm.recipe.load import validate_recipe
from dsvlm.train.loop import noise_seeds

RECIPE = "tiny-synthetic"


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: nested configs go in as one override


def _tiny_unet() -> dict[str, Any]:
    """The UNet `dsvlm pretrain-diffusion` builds for tiny-synthetic, inline: the same compute, random weights."""
    return unet_config(PretrainOptions(), channels=3)


# tiny-synthetic loads its pretrained frozen UNet from disk; a timing needs only its shape.
TINY = (_override("supervision.diffusion.unet_config", _tiny_unet()), "supervision.diffusion.pretrained=null")


# LLaVA-1.5-7B over SD 1.5 at 256 px: LLM forward / UNet forward FLOPs per sample ~ 30 (see paper_flops). The
# UNet (frozen, pixel space, 32x32, cross-attention at the two lower levels as SD 1.5 has it at three of four) is
# ~0.35 GFLOPs per image; the LLM is grown until the ratio matches. Pinned here, so recipe edits don't move it.
PROPORTIONAL_UNET = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [16, 32, 64],
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
PROPORTIONAL = (
    _override(
        "model.vision.config",
        {
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 4,
            "num_channels": 3,
        },
    ),
    _override(
        "model.llm.config",
        {
            "hidden_size": 768,
            "intermediate_size": 2048,
            "num_hidden_layers": 5,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
        },
    ),
    _override("supervision.diffusion.unet_config", PROPORTIONAL_UNET),
    "supervision.diffusion.pretrained=null",
    "supervision.freeze_unet=true",
    "supervision.reconstruct_per_batch=null",
)
# A VAE that halves the side: 32 px images -> 4x16x16 latents, the UNet's input.
SMALL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
}
LATENT = (
    "supervision.diffusion.pretrained=null",
    "supervision.diffusion.pixel_space=false",
    _override("supervision.diffusion.vae_config", SMALL_VAE),
    _override(
        "supervision.diffusion.unet_config", _tiny_unet() | {"in_channels": 4, "out_channels": 4, "sample_size": 16}
    ),
)


@dataclass(frozen=True)
class Arm:
    """One compared configuration: recipe overrides on top of its setup's, branch on or off, cache or not."""

    name: str
    overrides: tuple[str, ...] = ()
    supervise: bool = True
    cached: bool = False  # read latents from the dataset's latent cache


TEXT_ONLY = Arm("text only (baseline)", supervise=False)


@dataclass(frozen=True)
class Setup:
    """A family of arms timed together; the first arm is the baseline."""

    key: str
    title: str
    overrides: tuple[str, ...]
    batch_size: int
    repeats: int  # default timed rounds
    arms: tuple[Arm, ...]


SETUPS = {
    setup.key: setup
    for setup in (
        Setup(
            "tiny",
            "tiny-synthetic as is (pixel-space UNet, frozen)",
            TINY,
            32,
            7,
            (
                TEXT_ONLY,
                Arm("DS, 8 of 32 reconstructed (recipe)"),
                Arm("DS, all 32 reconstructed", ("supervision.reconstruct_per_batch=null",)),
            ),
        ),
        Setup(
            "proportional",
            "proportional: LLM/UNet FLOPs ~ LLaVA-1.5-7B / SD 1.5, frozen UNet",
            PROPORTIONAL,
            8,
            5,
            (TEXT_ONLY, Arm("DS, all 8 reconstructed")),
        ),
        Setup(
            "latent",
            "latent diffusion with a small inline VAE (8 of 32 reconstructed)",
            LATENT,
            32,
            7,
            (TEXT_ONLY, Arm("DS, VAE encode every step"), Arm("DS, cached latents", cached=True)),
        ),
    )
}


def arm_recipe(setup: Setup, arm: Arm) -> Recipe:
    """The arm's recipe; the text-only arm is the plain LLaVA baseline (branch off, not trained)."""
    recipe = load_recipe(RECIPE, [*setup.overrides, *arm.overrides])
    if arm.supervise:
        return recipe
    data = recipe.model_dump()
    data["supervision"]["enabled"] = False
    for stage in data["stages"]:
        stage["train"] = [group for group in stage["train"] if group != "supervision"]
    return validate_recipe(data, source=f"{RECIPE} (text only)")


class ArmRun:
    """One arm's model, optimizer and pre-collated batches; `step()` times one optimizer step."""

    def __init__(
        self, recipe: Recipe, stage_name: str, arm: Arm, dataset: Path, batch_size: int, n_batches: int
    ) -> None:
        stage = recipe.stage(stage_name)
        self.stage, self.seed = stage, recipe.run.seed
        with contextlib.redirect_stderr(io.StringIO()):  # freeze_for_stage prints its table
            self.model = build_model(recipe, words=synthetic_vocabulary())
            freeze_for_stage(self.model, stage.train)
        self.model.train()
        supervise = arm.supervise and self.model.supervision is not None
        latents = None
        if arm.cached:
            vae = self.model.supervision.vae if self.model.supervision is not None else None
            if vae is None:
                raise ValueError(f"arm {arm.name!r} reads cached latents but its recipe has no VAE")
            latents = LatentCache.open(
                dataset, vae_fingerprint(vae), recipe.supervision.resolution, image_geometry(recipe.model)
            )
        split = PreparedSplit(dataset, stage.split_name, latents=latents)
        collator = Collator(
            self.model.processor,
            stage.template_name,
            recipe.data.max_length,
            rec_resolution=recipe.supervision.resolution if supervise else None,
        )
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(self.seed)).tolist()
        if len(order) < n_batches * batch_size:
            raise ValueError(
                f"split {stage.split_name!r} has {len(order)} records, fewer than {n_batches} batches of {batch_size}"
            )
        self.batches, collate_s = [], []
        for b in range(n_batches):
            start = time.perf_counter()
            self.batches.append(collator([split[i] for i in order[b * batch_size : (b + 1) * batch_size]]))
            collate_s.append(time.perf_counter() - start)
        self.collate_s = median(collate_s)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=stage.lr, weight_decay=stage.weight_decay)
        self.supervise = supervise
        self.steps = 0

    def _batch(self) -> dict[str, torch.Tensor]:
        batch = self.batches[self.steps % len(self.batches)]
        batch["noise_seeds"] = noise_seeds(self.seed, self.steps, batch["sample_index"])
        return batch

    def _finish_step(self) -> None:
        if self.stage.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.stage.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def step(self) -> float:
        """Seconds of one optimizer step (forward, backward, clipping, AdamW, zero_grad)."""
        batch = self._batch()
        start = time.perf_counter()
        self.model(batch, supervise=self.supervise).loss.backward()
        self._finish_step()
        return time.perf_counter() - start

    def flops(self) -> dict[str, float | int]:
        """GFLOPs of one step: forward by component, and forward + backward (math attention, so it counts); the
        batch's sample and reconstructed-image counts."""
        batch = self._batch()
        with sdpa_kernel(SDPBackend.MATH):
            with FlopCounterMode(display=False) as forward:
                out = self.model(batch, supervise=self.supervise)
            with FlopCounterMode(display=False) as backward:
                out.loss.backward()
        self._finish_step()
        counts = forward.get_flop_counts()

        def giga(*names: str) -> float:
            return sum(sum(counts.get(f"DSVLM.{name}", {}).values()) for name in names) / 1e9

        branch = giga("supervision")
        unet = giga("supervision.unet")
        return {
            "llm_fwd": giga("vlm.model.language_model", "vlm.lm_head"),
            "vision_fwd": giga("vlm.model.vision_tower"),
            "unet_fwd": unet,
            "branch_other_fwd": branch - unet,  # adapters, VAE encode/decode, losses
            "fwd": forward.get_total_flops() / 1e9,
            "step": (forward.get_total_flops() + backward.get_total_flops()) / 1e9,
            "samples": len(batch["input_ids"]),
            "reconstructed": out.n_rec,
        }


def ensure_latent_cache(setup: Setup, dataset: Path) -> float:
    """Build the latent cache for the setup's VAE (seconds taken)."""
    recipe = load_recipe(RECIPE, list(setup.overrides))
    vae = load_vae(recipe.supervision.diffusion, recipe.run.seed)  # the branch's VAE: same config, same seed
    start = time.perf_counter()
    build_latent_cache(
        dataset, vae, recipe.supervision.resolution, vae_fingerprint(vae), image_geometry(recipe.model), progress=False
    )
    return time.perf_counter() - start


def time_setup(
    setup: Setup, stage_name: str, dataset: Path, repeats: int, warmup: int, n_batches: int
) -> dict[str, Any]:
    """Warm up every arm, then time them round-robin; FLOPs counted after timing."""
    runs = {
        arm.name: ArmRun(arm_recipe(setup, arm), stage_name, arm, dataset, setup.batch_size, n_batches)
        for arm in setup.arms
    }
    for run in runs.values():
        for _ in range(warmup):
            run.step()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name in round_robin(list(runs), r):
            times[name].append(runs[name].step())
    base = setup.arms[0].name
    arms = []
    for arm in setup.arms:
        run = runs[arm.name]
        flops = run.flops()
        arms.append(
            {
                "name": arm.name,
                "step_s_median": round(median(times[arm.name]), 4),
                "step_s_all": [round(t, 4) for t in times[arm.name]],
                "collate_s_median": round(run.collate_s, 4),
                "time_ratio": round(median(times[arm.name]) / median(times[base]), 3),
                # The ratio within each round (less sensitive to load that shifts between rounds) and its spread.
                "time_ratio_rounds": ratio_spread(times[arm.name], times[base]),
                "gflops": {k: round(v, 3) for k, v in flops.items()},
            }
        )
    for arm in arms:
        arm["flop_ratio"] = round(arm["gflops"]["step"] / arms[0]["gflops"]["step"], 3)
    # Per sample, as the paper-setting ratio: LLM forward of one sample over the UNet forward of one image.
    llm = arms[0]["gflops"]["llm_fwd"] / arms[0]["gflops"]["samples"]
    sup = next((a["gflops"] for a in arms if a["gflops"]["reconstructed"]), None)
    return {
        "key": setup.key,
        "title": setup.title,
        "batch_size": setup.batch_size,
        "stage": stage_name,
        "trained": runs[setup.arms[-1].name].stage.train,
        "overrides": list(setup.overrides),
        "llm_fwd_over_unet_fwd_per_sample": round(llm / (sup["unet_fwd"] / sup["reconstructed"]), 2) if sup else None,
        "arms": arms,
    }


def memory_of(
    setup: Setup, arm_index: int, stage_name: str, dataset: Path, steps: int, threads: int | None
) -> dict[str, float]:
    """Peak RSS of one arm in a fresh process (see the module docstring)."""
    job = {
        "setup": setup.key,
        "arm": arm_index,
        "stage": stage_name,
        "data": str(dataset),
        "steps": steps,
        "threads": threads,
    }
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, __file__, "--memory-child", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"memory run of {setup.key}/{arm_index} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_child(job: dict[str, Any]) -> None:
    """The fresh process of `memory_of`: build one arm, run its steps under the RSS sampler, print JSON."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    setup = SETUPS[job["setup"]]
    arm = setup.arms[job["arm"]]
    run = ArmRun(arm_recipe(setup, arm), job["stage"], arm, Path(job["data"]), setup.batch_size, 1)
    with RssPeak() as rss:
        for _ in range(job["steps"]):
            run.step()
    # The kernel's high-water mark of this process image cross-checks the sampler (equal when it caught the
    # steps' peak). Not ru_maxrss: Linux carries the parent's peak into it across fork + exec.
    status = Path("/proc/self/status").read_text()
    hwm_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    print(
        json.dumps(
            {
                "rss_before_mb": round(rss.start_mb, 1),
                "rss_peak_mb": round(rss.peak_mb, 1),
                "rss_increase_mb": round(rss.increase_mb, 1),
                "vm_hwm_mb": round(hwm_kb / 1024, 1),
            }
        )
    )


# ------------------------------------------------------------------------------- paper setting, meta device


def _tflops(fn: Callable[[], Any]) -> float:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def paper_flops(tokens: int) -> dict[str, Any]:
    """TFLOPs per sample of LLaVA-1.5-7B (CLIP-L/336 + Vicuna-7B, `tokens` in the LLM) and of the DS branch
    (SD 1.5 UNet + VAE at 256 px, MoE over layers 8/16/24 + connector, 576 tokens each), counted on meta."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from dsvlm.model.supervision.branch import DiffusionSupervision
    from dsvlm.recipe.schema import SupervisionConfig

    meta = torch.device("meta")
    image_tokens = 576
    with meta:
        llm = LlamaForCausalLM(LlamaConfig(**VICUNA_7B))
        vision = CLIPVisionModel(CLIPVisionConfig(**CLIP_L14_336))
        projector = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 4096))
        branches = {
            loss: DiffusionSupervision(
                SupervisionConfig(
                    diffusion={"pretrained": None, "unet_config": SD15_UNET, "vae_config": SD15_VAE},
                    loss={loss: 1.0},
                    resolution=256,
                ),
                vision_hidden_size=1024,
                llm_hidden_size=4096,
            )
            for loss in ("perceptual", "eps_mse")
        }
    params = {
        "llm": sum(p.numel() for p in llm.parameters()),
        "unet": sum(p.numel() for p in branches["perceptual"].unet.parameters()),
    }

    def embeds() -> torch.Tensor:
        return torch.empty(1, tokens, 4096, device=meta, requires_grad=True)

    def pixels(side: int) -> torch.Tensor:
        return torch.empty(1, 3, side, side, device=meta)

    def llm_step(trained: bool) -> None:
        llm.requires_grad_(trained)
        llm(inputs_embeds=embeds()).logits.sum().backward()

    def vision_step() -> None:
        vision.requires_grad_(True)
        vision(pixel_values=pixels(336)).last_hidden_state.sum().backward()

    def branch_step(loss: str, cached: bool) -> None:
        # Condition gradients as in stage 2 (stage 1 skips those of the frozen encoder: < 0.1 % fewer FLOPs).
        branch = branches[loss]
        conditions = {
            name: torch.empty(1, image_tokens, 4096 if name == "connector" else 1024, device=meta, requires_grad=True)
            for name in branch.condition_names
        }
        latents = torch.empty(1, 4, 32, 32, device=meta) if cached else None
        branch(conditions, pixels(256), latents, torch.tensor([0]))["loss"].sum().backward()

    perceptual = branches["perceptual"]
    unet_conditions = tuple(torch.empty(1, image_tokens, 768, device=meta) for _ in perceptual.condition_names)
    fwd = {
        "llm": _tflops(lambda: llm(inputs_embeds=embeds())),
        "vision": _tflops(lambda: vision(pixel_values=pixels(336))),
        "unet": _tflops(
            lambda: perceptual.unet(
                torch.empty(1, 4, 32, 32, device=meta),
                torch.tensor([0], device=meta),
                encoder_hidden_states=unet_conditions,
            )
        ),
        "vae_encode": _tflops(lambda: perceptual.encode(pixels(256))),
        "branch_perceptual": _tflops(
            lambda: perceptual(
                {
                    n: torch.empty(1, image_tokens, 4096 if n == "connector" else 1024, device=meta)
                    for n in perceptual.condition_names
                },
                pixels(256),
                None,
                torch.tensor([0]),
            )
        ),
    }
    projector_step = _tflops(
        lambda: projector(torch.empty(1, image_tokens, 1024, device=meta, requires_grad=True)).sum().backward()
    )
    # Stage 1 trains the connector (+ branch): the LLM and encoder are frozen, the text loss still back-propagates
    # through the LLM to the image tokens. Stage 2 trains all, with gradient checkpointing (one more forward).
    stage1 = fwd["vision"] + projector_step + _tflops(lambda: llm_step(False))
    stage2 = _tflops(vision_step) + projector_step + _tflops(lambda: llm_step(True)) + fwd["vision"] + fwd["llm"]
    branch = {
        "perceptual": _tflops(lambda: branch_step("perceptual", False)),
        "perceptual, latent cache": _tflops(lambda: branch_step("perceptual", True)),
        "eps_mse, latent cache": _tflops(lambda: branch_step("eps_mse", True)),
    }
    return {
        "tokens": tokens,
        "params": params,
        "fwd_tflops": {k: round(v, 4) for k, v in fwd.items()},
        "llm_fwd_over_unet_fwd": round(fwd["llm"] / fwd["unet"], 2),
        "llm_fwd_over_branch_fwd": round(fwd["llm"] / fwd["branch_perceptual"], 2),
        "step_tflops_text_only": {"1": round(stage1, 3), "2": round(stage2, 3)},
        "step_tflops_branch": {k: round(v, 3) for k, v in branch.items()},
        "flop_overhead": {k: {"1": round(v / stage1, 3), "2": round(v / stage2, 3)} for k, v in branch.items()},
    }


# ------------------------------------------------------------------------------------------------- output


def _ratio_cell(ratio: float, rounds: dict[str, float]) -> str:
    return escape(f"{ratio:.2f} ({rounds['median']:.2f} [{rounds['p25']:.2f}-{rounds['p75']:.2f}])")


def print_tables(console: Console, paper: dict[str, Any] | None, results: list[dict[str, Any]]) -> None:
    if paper is not None:
        f = paper["fwd_tflops"]
        table = Table(
            "part",
            "fwd TFLOPs / sample",
            title=f"paper setting (meta device, {paper['tokens']} LLM "
            f"tokens): LLM fwd / UNet fwd = {paper['llm_fwd_over_unet_fwd']}, "
            f"LLM fwd / branch fwd = {paper['llm_fwd_over_branch_fwd']}",
        )
        names = {
            "llm": "Vicuna-7B LLM",
            "vision": "CLIP-L/336",
            "unet": "SD 1.5 UNet (MoE, 4x576 cond. tokens)",
            "vae_encode": "SD VAE encode (cacheable)",
            "branch_perceptual": "whole branch, perceptual loss",
        }
        for key, name in names.items():
            table.add_row(name, f"{f[key]:.3f}")
        console.print(table)
        table = Table(
            "training step FLOPs / sample",
            "stage 1 (connector)",
            "stage 2 (all, grad ckpt)",
            title="paper setting: FLOPs of a training step, branch overhead",
        )
        text = paper["step_tflops_text_only"]
        table.add_row("text only (TFLOPs)", f"{text['1']:.2f}", f"{text['2']:.2f}")
        for name, over in paper["flop_overhead"].items():
            table.add_row(f"+ branch, {name}", f"+{over['1']:.1%}", f"+{over['2']:.1%}")
        console.print(table)
    for result in results:
        table = Table(
            "arm",
            "step s (median)",
            escape("x baseline time (rounds: median [p25-p75])"),
            "x baseline FLOPs",
            "GFLOPs/step",
            "collate s",
            "peak RSS +MB",
            title=f"{result['title']}: batch {result['batch_size']}, stage {result['stage']}, "
            f"LLM fwd / UNet fwd per sample = {result['llm_fwd_over_unet_fwd_per_sample']}",
        )
        for arm in result["arms"]:
            memory = arm.get("memory")
            table.add_row(
                arm["name"],
                f"{arm['step_s_median']:.3f}",
                _ratio_cell(arm["time_ratio"], arm["time_ratio_rounds"]),
                f"{arm['flop_ratio']:.3f}",
                f"{arm['gflops']['step']:.1f}",
                f"{arm['collate_s_median']:.3f}",
                f"{memory['rss_increase_mb']:.0f}" if memory else "-",
            )
        console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default=",".join(SETUPS), help="Comma-separated: " + ", ".join(SETUPS))
    parser.add_argument("--repeats", type=int, default=None, help="Timed rounds per arm (default per setup: 7/5/7).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps per arm first.")
    parser.add_argument("--batches", type=int, default=4, help="Distinct pre-collated batches cycled per arm.")
    parser.add_argument("--stage", default="instruct", choices=["align", "instruct"], help="Recipe stage to mimic.")
    parser.add_argument("--memory-steps", type=int, default=2, help="Steps of each fresh-process memory run.")
    parser.add_argument("--no-memory", action="store_true", help="Skip the peak-memory runs.")
    parser.add_argument("--no-paper", action="store_true", help="Skip the paper-setting FLOP count.")
    parser.add_argument("--paper-tokens", type=int, default=650, help="LLM tokens per sample (576 image + text).")
    parser.add_argument(
        "--data", type=Path, default=None, help="Prepared synthetic set to use (default: a temporary 256/256/16 one)."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this JSON file.")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = [k.strip() for k in args.setups.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SETUPS]
    if unknown:
        parser.error(f"unknown setup(s) {unknown}; choose from {list(SETUPS)}")

    console = stderr_console()
    started = time.perf_counter()
    report: dict[str, Any] = {"command": command_line(), "machine": machine(), "load_start": loadavg()}
    paper = None if args.no_paper else paper_flops(args.paper_tokens)
    report["paper_setting"] = paper
    results = []
    with tempfile.TemporaryDirectory(prefix="dsvlm-train-bench-") as tmp:
        dataset = args.data
        if dataset is None:
            dataset = prepare_synthetic(Path(tmp) / "data", n_align=256, n_instruct=256, n_eval=16)
        for key in keys:
            setup = SETUPS[key]
            console.print(f"[bold]{setup.title}[/]")
            cache_s = ensure_latent_cache(setup, dataset) if any(a.cached for a in setup.arms) else None
            result = time_setup(setup, args.stage, dataset, args.repeats or setup.repeats, args.warmup, args.batches)
            if cache_s is not None:
                result["latent_cache_build_s"] = round(cache_s, 2)
            if not args.no_memory:
                for i, arm in enumerate(result["arms"]):
                    arm["memory"] = memory_of(setup, i, args.stage, dataset, args.memory_steps, args.threads)
            results.append(result)
    report["setups"] = results
    report["load_end"] = loadavg()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print_tables(console, paper, results)
    console.print(f"load average: start {report['load_start']}, end {report['load_end']}; {report['wall_s']} s")
    write_report(args.json, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
