"""Pretrain a small text-to-image diffusion model: the stand-in for Stable Diffusion at toy scale.

DS-VLM steers a diffusion model that was pretrained on images first and is then frozen. No such model can be
fetched offline, so `dsvlm pretrain-diffusion` trains one on a prepared dataset's captioned images (the align
split) and writes it in Stable Diffusion's layout — `unet/` (UNet2DConditionModel with cross-attention),
`text_encoder/` (a small CLIPTextModel), `tokenizer/`, `scheduler/` (SD 1.5's noise schedule), `vae/` when a
latent space is trained, and `model_index.json` — so the supervision branch loads it through the same
`from_pretrained` path as `stable-diffusion-v1-5`.

Phases: an optional AutoencoderKL (`vae_steps > 0`; 0 = pixel space, the identity autoencoder), then the
caption-conditioned UNet and its text encoder with the ε-MSE loss and caption dropout (for classifier-free
guidance). Checkpoints make it resumable; `pretrain.json`, written last, marks a finished model.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from dsvlm.console import progress_bar
from dsvlm.data.detect import detect_object
from dsvlm.data.prepared import PreparedDataset
from dsvlm.data.synthetic import sample_scene, scene_caption
from dsvlm.errors import DataError, DsvlmError
from dsvlm.io import atomic_dir, atomic_write_json
from dsvlm.model.supervision.vae import encode
from dsvlm.outputs import DIFFUSION_MODEL, check_output, write_marker, writer_lock
from dsvlm.plots import image_grid, plot_curves

log = logging.getLogger(__name__)

INFO = "pretrain.json"  # written last: its presence marks a finished model
CHECKPOINTS = "checkpoints"
MAX_TOKENS = 77  # SD's text length: captions are padded to it, as StableDiffusionPipeline does
SPECIALS = ("[UNK]", "[PAD]", "<|startoftext|>", "<|endoftext|>")
# Stable Diffusion 1.5's training schedule (scheduler/scheduler_config.json of the hub repo).
SD15_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def schedule(options: PretrainOptions) -> dict[str, Any]:
    """SD 1.5's schedule with the chosen prediction type; pixel space clips x̂0 to the image range."""
    return {**SD15_SCHEDULE, "prediction_type": options.prediction_type, "clip_sample": options.pixel_space}


@dataclass(frozen=True)
class PretrainOptions:
    """What `dsvlm pretrain-diffusion` trains; the defaults suit the synthetic set on two CPU cores."""

    steps: int = 1000
    vae_steps: int = 0  # 0 = diffuse in pixel space (no VAE)
    batch_size: int = 32
    lr: float = 1e-3
    resolution: int = 32
    width: int = 16  # channels of the UNet's first level; the next two levels have 2x and 4x
    text_width: int = 64  # the text encoder's width = the UNet's cross_attention_dim
    caption_dropout: float = 0.1
    # What the UNet predicts. `sample` (x0) learns clean, recognisable scenes within a few hundred CPU steps on
    # flat synthetic images, where ε-prediction still leaves visible noise; SD 1.5 itself uses `epsilon`.
    prediction_type: str = "sample"
    seed: int = 0
    split: str = "align"
    max_images: int = 20_000
    checkpoint_every: int = 200
    guidance_scale: float = 3.0
    sample_steps: int = 20
    eval_captions: int = 64

    def check(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "resolution",
            "width",
            "text_width",
            "checkpoint_every",
            "sample_steps",
            "eval_captions",
            "max_images",
        ):
            if getattr(self, name) < 1:
                raise DsvlmError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.vae_steps < 0:
            raise DsvlmError(f"--vae-steps must be >= 0 (0 = pixel space), got {self.vae_steps}")
        if self.resolution % 8:
            raise DsvlmError(f"--resolution must be a multiple of 8, got {self.resolution}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise DsvlmError(
                f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}"
            )
        if not 0.0 <= self.caption_dropout < 1.0:
            raise DsvlmError(f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")

    @property
    def pixel_space(self) -> bool:
        return self.vae_steps == 0


def unet_config(options: PretrainOptions, channels: int) -> dict[str, Any]:
    """SD's UNet layout at toy scale: three levels, one block each, cross-attention on the lowest level only
    (attention at 16x16 doubled the CPU step time: its convolutions already dominate)."""
    w = options.width
    return {
        "sample_size": options.resolution // (1 if options.pixel_space else 2),
        "in_channels": channels,
        "out_channels": channels,
        "layers_per_block": 1,
        "block_out_channels": [w, 2 * w, 4 * w],
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "cross_attention_dim": options.text_width,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def vae_config(options: PretrainOptions) -> dict[str, Any]:
    """An AutoencoderKL with one downsampling (factor 2) and SD's 4 latent channels."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "block_out_channels": [16, 32],
        "norm_num_groups": 8,
        "sample_size": options.resolution,
    }


def text_config(options: PretrainOptions, vocab_size: int) -> CLIPTextConfig:
    width = options.text_width
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )


def build_tokenizer(captions: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the captions' words (the toy stand-in for CLIP's BPE)."""
    pre = Whitespace()
    words = sorted({piece for text in captions for piece, _ in pre.pre_tokenize_str(text)} - set(SPECIALS))
    backend = Tokenizer(WordLevel({t: i for i, t in enumerate([*SPECIALS, *words])}, unk_token=SPECIALS[0]))
    backend.pre_tokenizer = pre
    backend.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=SPECIALS[0],
        pad_token=SPECIALS[1],
        bos_token=SPECIALS[2],
        eos_token=SPECIALS[3],
        model_max_length=MAX_TOKENS,
    )


@dataclass
class Corpus:
    images: torch.Tensor  # (n, 3, R, R) uint8
    captions: list[str]


def load_corpus(dataset_dir: Path, options: PretrainOptions) -> Corpus:
    """The captioned images of a split: each record's image and its first answer (the caption)."""
    dataset = PreparedDataset(dataset_dir)
    if options.split not in dataset.splits:
        raise DataError(f"{dataset_dir}: no split {options.split!r} to pretrain on (has {', '.join(dataset.splits)})")
    images, captions = [], []
    for record in dataset.records(options.split):
        answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
        if record["image"] is None or not answers:
            continue
        image = dataset.load_image(record).resize((options.resolution, options.resolution), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1))
        captions.append(answers[0])
        if len(images) == options.max_images:
            break
    if len(images) < options.batch_size:
        raise DataError(
            f"{dataset_dir}: split {options.split!r} has {len(images)} captioned images, fewer than "
            f"one batch ({options.batch_size})"
        )
    return Corpus(torch.stack(images), captions)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> floats in [-1, 1] (the diffusion models' input range)."""
    return images.float() / 127.5 - 1.0


class Models(torch.nn.Module):
    """The trained parts; one module so checkpoints are one state dict. With them the noise schedule the UNet is
    trained on (no weights)."""

    def __init__(self, options: PretrainOptions, vocab_size: int) -> None:
        super().__init__()
        self.noise_schedule = DDPMScheduler.from_config(schedule(options))
        with torch.random.fork_rng(devices=[]):  # seeded weights without moving the caller's random stream
            torch.manual_seed(options.seed)
            self.vae = None if options.pixel_space else AutoencoderKL(**vae_config(options))
            self.unet = random_unet(options)
            self.text_encoder = CLIPTextModel(text_config(options, vocab_size))


def random_unet(options: PretrainOptions) -> UNet2DConditionModel:
    """The UNet of these options, freshly initialised from the current random stream."""
    return UNet2DConditionModel(**unet_config(options, 3 if options.pixel_space else 4))


@dataclass
class Pipeline:
    """Everything needed to generate: tokenizer, text encoder, UNet, optional VAE, schedule."""

    tokenizer: PreTrainedTokenizerFast
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL | None
    scheduler_config: dict[str, Any]

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids).last_hidden_state

    def from_model_space(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.vae is None else self.vae.decode(x / self.vae.config.scaling_factor).sample

    @torch.no_grad()
    def generate(self, captions: list[str], steps: int, guidance: float, seed: int) -> torch.Tensor:
        """DDIM with classifier-free guidance; images in [0, 1]."""
        ddim = DDIMScheduler.from_config(self.scheduler_config)
        ddim.set_timesteps(steps)
        cond, uncond = self.encode_text(captions), self.encode_text([""] * len(captions))
        size = self.unet.config.sample_size
        x = torch.randn(
            len(captions), self.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed)
        )
        for t in ddim.timesteps:
            eps = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            eps_uncond, eps_cond = eps.chunk(2)
            x = ddim.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, x).prev_sample
        return ((self.from_model_space(x) + 1) / 2).clamp(0, 1)


def pretrain_diffusion(
    dataset_dir: Path,
    out: Path,
    options: PretrainOptions = PretrainOptions(),
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Train (or reuse) the diffusion model in `out`; returns `out`.

    A finished `out` trained with the same options on the same dataset is reused as it is; other contents are
    an error unless `resume` (continue from the latest checkpoint) or `overwrite` (start again; only a
    directory dsvlm pretrained is replaced).
    """
    options.check()
    out = Path(out)
    fingerprint = {"options": asdict(options), "dataset": _dataset_fingerprint(Path(dataset_dir), options.split)}
    if _finished(out, fingerprint) and not overwrite:
        log.info("reusing the pretrained diffusion model in %s", out)
        return out
    with writer_lock(out):
        _claim(out, resume, overwrite)
        return _pretrain(Path(dataset_dir), out, options, fingerprint, resume, progress)


def _pretrain(
    dataset_dir: Path, out: Path, options: PretrainOptions, fingerprint: dict[str, Any], resume: bool, progress: bool
) -> Path:
    corpus = load_corpus(dataset_dir, options)
    tokenizer = build_tokenizer(corpus.captions)
    models = Models(options, len(tokenizer))
    started = time.perf_counter()
    state = _load_checkpoint(out / CHECKPOINTS, models) if resume else None
    history: list[dict[str, Any]] = state["history"] if state else []
    phases = ([("vae", options.vae_steps)] if models.vae is not None else []) + [("unet", options.steps)]
    targets = None
    steps: dict[str, int] = dict(state["steps"]) if state else {}  # per phase, for every checkpoint to come
    with progress_bar(progress, info=True) as bar:
        for phase, total in phases:
            done = state["steps"].get(phase, 0) if state else 0
            if phase == "unet":
                # Set here, not after the VAE phase: a run resumed past that phase needs it too (it is config,
                # not weights); then the UNet's targets are encoded once, not every step.
                if models.vae is not None:
                    _set_scaling_factor(models.vae, corpus)
                targets = _unet_targets(models.vae, corpus)
            if done >= total:
                continue
            optimizer = _optimizer(models, phase, options)
            if state and state["phase"] == phase:
                optimizer.load_state_dict(
                    torch.load(out / CHECKPOINTS / state["dir"] / "optimizer.pt", weights_only=True)
                )
            task = bar.add_task(f"pretrain {phase}", total=total, completed=done, info="")
            for step in range(done, total):
                loss = _train_step(models, phase, corpus, targets, tokenizer, options, step, optimizer, total)
                steps[phase] = step + 1
                history.append({"phase": phase, "step": step + 1, "loss": round(loss, 6)})
                bar.update(task, completed=step + 1, info=f"loss {loss:.4f}")
                if (step + 1) % options.checkpoint_every == 0 and step + 1 < total:
                    _save_checkpoint(out / CHECKPOINTS, models, optimizer, phase, steps, history)
            state = None
    wall = time.perf_counter() - started
    pipeline = Pipeline(
        tokenizer,
        models.text_encoder.eval(),
        models.unet.eval(),
        models.vae.eval() if models.vae is not None else None,
        schedule(options),
    )
    figure = _evaluate(pipeline, options, out)
    _save(out, pipeline, options)
    _plot_history(history, out / "loss.png")
    info = {
        "format": "dsvlm-pretrained-diffusion",
        "fingerprint": fingerprint,
        "wall_time_s": round(wall, 1),
        "final_loss": {p: _tail_mean(history, p) for p, _ in phases},
        "learned": figure,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(out / INFO, info)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    log.info(
        "diffusion pretraining finished in %.0f s: caption match %.0f %% (random UNet %.0f %%) -> %s",
        wall,
        100 * figure["trained"]["both"],
        100 * figure["random_unet"]["both"],
        out,
    )
    return out


def _dataset_fingerprint(dataset_dir: Path, split: str) -> dict[str, Any]:
    """What identifies the training images: the split's record count and source checksum (not the path, so a
    regenerated identical dataset reuses the model)."""
    info = PreparedDataset(dataset_dir).manifest["splits"].get(split, {})
    return {"split": split, "records": info.get("records"), "source": info.get("source")}


def _finished(out: Path, fingerprint: dict[str, Any]) -> bool:
    try:
        info = json.loads((out / INFO).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("fingerprint") == json.loads(json.dumps(fingerprint))


def _claim(out: Path, resume: bool, overwrite: bool) -> None:
    """Make `out` ours to write: resumable (it carries our marker), or new, empty or, with `overwrite`, an earlier
    diffusion model dsvlm wrote (the shared `--overwrite` guard)."""
    if resume and (out / DIFFUSION_MODEL.marker).is_file():
        return
    check_output(out, DIFFUSION_MODEL, overwrite)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_marker(out, DIFFUSION_MODEL)


def _optimizer(models: Models, phase: str, options: PretrainOptions) -> torch.optim.Optimizer:
    if phase == "vae":
        params = list(models.vae.parameters())
    else:
        params = list(models.unet.parameters()) + list(models.text_encoder.parameters())
    return torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)


def _lr_factor(step: int, total: int) -> float:
    """Linear warmup over 5 % of the steps, then cosine decay to 10 %."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _batch_indices(options: PretrainOptions, phase: str, step: int, n: int) -> torch.Tensor:
    # Seeded by (seed, phase, step): a resumed run draws exactly the batches the uninterrupted one would.
    generator = torch.Generator().manual_seed(options.seed * 1_000_003 + step * 2 + (phase == "unet"))
    return torch.randint(0, n, (options.batch_size,), generator=generator)


def _train_step(
    models: Models,
    phase: str,
    corpus: Corpus,
    targets: torch.Tensor | None,
    tokenizer: PreTrainedTokenizerFast,
    options: PretrainOptions,
    step: int,
    optimizer: torch.optim.Optimizer,
    total: int,
) -> float:
    for group in optimizer.param_groups:
        group["lr"] = options.lr * _lr_factor(step, total)
    index = _batch_indices(options, phase, step, len(corpus.captions))
    generator = torch.Generator().manual_seed(options.seed * 7_000_003 + step)
    if phase == "vae":
        images = to_unit(corpus.images[index])
        posterior = models.vae.encode(images).latent_dist
        reconstruction = models.vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(reconstruction, images) + 1e-6 * posterior.kl().mean()
    else:
        target = targets[index]
        captions = [
            c if random.Random(f"{options.seed}/{step}/{i}").random() >= options.caption_dropout else ""
            for i, c in enumerate(corpus.captions[j] for j in index.tolist())
        ]
        ids = tokenizer(
            captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
        states = models.text_encoder(ids).last_hidden_state
        scheduler = models.noise_schedule
        noise = torch.randn(target.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(target),), generator=generator)
        noisy = scheduler.add_noise(target, noise, timesteps)
        goal = {"epsilon": noise, "sample": target}.get(options.prediction_type)
        if goal is None:
            goal = scheduler.get_velocity(target, noise, timesteps)
        loss = F.mse_loss(models.unet(noisy, timesteps, encoder_hidden_states=states).sample, goal)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def _unet_targets(vae: AutoencoderKL | None, corpus: Corpus, chunk: int = 256) -> torch.Tensor:
    """Every corpus image in the UNet's input space: pixels in [-1, 1], or latents encoded as training encodes."""
    if vae is None:
        return to_unit(corpus.images)
    return torch.cat([encode(vae, to_unit(corpus.images[i : i + chunk])) for i in range(0, len(corpus.images), chunk)])


@torch.no_grad()
def _set_scaling_factor(vae: AutoencoderKL, corpus: Corpus) -> None:
    """SD's convention: scale latents to unit variance (SD 1.5's 0.18215 was found the same way)."""
    latents = vae.encode(to_unit(corpus.images[:512])).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


def _save_checkpoint(
    root: Path,
    models: Models,
    optimizer: torch.optim.Optimizer,
    phase: str,
    steps: dict[str, int],
    history: list[dict[str, Any]],
) -> None:
    name = f"{phase}-{steps[phase]:06d}"
    with atomic_dir(root / name, replace=True) as tmp:
        save_file({k: v.contiguous() for k, v in models.state_dict().items()}, str(tmp / "models.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_write_json(tmp / "state.json", {"phase": phase, "steps": steps, "history": history, "dir": name})
    for old in sorted(p for p in root.iterdir() if p.is_dir() and p.name != name and not p.name.startswith(".")):
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(root: Path, models: Models) -> dict[str, Any] | None:
    """The latest complete checkpoint loaded into `models`; None when there is none."""
    states = {p: json.loads((p / "state.json").read_text()) for p in root.glob("*-*") if (p / "state.json").is_file()}
    if not states:
        log.warning("no checkpoint in %s: starting from scratch", root)
        return None
    latest = max(states, key=lambda p: (states[p]["steps"].get("unet", 0), states[p]["steps"].get("vae", 0)))
    try:
        models.load_state_dict(load_file(str(latest / "models.safetensors")))
    except (OSError, RuntimeError) as exc:
        raise DsvlmError(f"checkpoint {latest} does not load ({exc}); remove it or use --overwrite") from exc
    log.info("resuming diffusion pretraining from %s", latest)
    return states[latest]


def _tail_mean(history: list[dict[str, Any]], phase: str, n: int = 50) -> float | None:
    values = [h["loss"] for h in history if h["phase"] == phase][-n:]
    return round(sum(values) / len(values), 5) if values else None


def eval_scenes(options: PretrainOptions) -> list[tuple[str, str, str]]:
    """Held-out one-object captions (their own random stream) with the colour and shape they ask for."""
    rng = random.Random(f"dsvlm-diffusion-eval/{options.seed}")
    scenes = [sample_scene(rng, 1) for _ in range(options.eval_captions)]
    return [(scene_caption(s), s.objects[0].colour, s.objects[0].shape) for s in scenes]


def _evaluate(pipeline: Pipeline, options: PretrainOptions, out: Path) -> dict[str, Any]:
    """Share of samples whose detected colour / shape match the caption: trained UNet vs a random UNet of the
    same shape (same text encoder), on held-out captions. Writes samples.png (rows: trained, random)."""
    scenes = eval_scenes(options)
    captions = [c for c, _, _ in scenes]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed + 1)
        untrained = random_unet(options).eval()
    results, rows = {}, []
    for name, unet in (("trained", pipeline.unet), ("random_unet", untrained)):
        generator = Pipeline(pipeline.tokenizer, pipeline.text_encoder, unet, pipeline.vae, pipeline.scheduler_config)
        images = generator.generate(captions, options.sample_steps, options.guidance_scale, options.seed)
        found = [detect_object((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in images]
        colour = [f[0] == c for f, (_, c, _) in zip(found, scenes, strict=True)]
        shape = [f[1] == s for f, (_, _, s) in zip(found, scenes, strict=True)]
        results[name] = {
            "colour": _share(colour),
            "shape": _share(shape),
            "both": _share([a and b for a, b in zip(colour, shape, strict=True)]),
        }
        rows.append(images[:12])
    image_grid(rows, out / "samples.png")
    return {
        "captions": len(scenes),
        "chance": {"colour": 0.25, "shape": round(1 / 3, 4), "both": round(1 / 12, 4)},
        "detector": "dsvlm.data.detect.detect_object",
        "guidance_scale": options.guidance_scale,
        "sampler_steps": options.sample_steps,
        "sample_captions": captions[:12],
        **results,
    }


def _share(flags: list[bool]) -> float:
    return round(sum(flags) / max(1, len(flags)), 4)


def _save(out: Path, pipeline: Pipeline, options: PretrainOptions) -> None:
    """The diffusers layout, each component written atomically."""
    parts: list[tuple[str, Any]] = [
        ("unet", pipeline.unet),
        ("text_encoder", pipeline.text_encoder),
        ("tokenizer", pipeline.tokenizer),
    ]
    if pipeline.vae is not None:
        parts.append(("vae", pipeline.vae))
    for name, part in parts:
        with atomic_dir(out / name, replace=True) as tmp:
            part.save_pretrained(tmp)
    with atomic_dir(out / "scheduler", replace=True) as tmp:
        DDPMScheduler.from_config(pipeline.scheduler_config).save_pretrained(tmp)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _diffusers_version(),
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"] if pipeline.vae is not None else [None, None],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    atomic_write_json(out / "model_index.json", index)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _plot_history(history: list[dict[str, Any]], out: Path) -> None:
    curves = {}
    for phase in dict.fromkeys(h["phase"] for h in history):
        points = [(h["step"], h["loss"]) for h in history if h["phase"] == phase]
        steps, losses = zip(*points, strict=True)
        curves[f"{phase} ({'L1' if phase == 'vae' else 'MSE'})"] = (list(steps), list(losses))
    plot_curves(curves, out, "diffusion pretraining", "step", log_scale=True)
