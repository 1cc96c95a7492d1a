"""The recipe: one pydantic model, composed of one sub-model per concern.

Every field has a description (``dsvlm recipe schema`` exports them) and a default that suits the
paper's LLaVA-1.5 setting unless said otherwise. Cross-field checks live on the model that owns
both fields, so an error names the exact path.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator

from dsvlm.errors import RecipeError

log = logging.getLogger(__name__)

ModuleName = Literal["connector", "vision", "llm", "supervision"]
StageName = Literal["align", "instruct"]


@functools.cache  # once per process: a run's recipe is validated several times
def _warn_renamed(field: str, old: str, new: str) -> None:
    log.warning("%s: %r is now called %r; the old name still works", field, old, new)


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, not silently ignored; so are infinite and NaN
    numbers, which cannot train."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class PretrainedOrInline(Strict):
    """A component given either by a hub id / local directory, or by an inline config (tests, demo)."""

    pretrained: str | None = Field(
        None, description="Hugging Face hub id or local directory loaded with from_pretrained."
    )
    config: dict[str, Any] | None = Field(
        None,
        description="Inline config (the kwargs of the transformers/diffusers config class) for a randomly "
        "initialised component; used by tests and the CPU demo.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for `pretrained`.")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> PretrainedOrInline:
        if (self.pretrained is None) == (self.config is None):
            raise ValueError("give exactly one of `pretrained` (hub id or directory) or `config` (inline)")
        return self


class VisionConfig(PretrainedOrInline):
    type: Literal["clip", "siglip"] = Field(
        "clip",
        description="Encoder family; decides the CLS arithmetic (clip: select strategy `default`, one "
        "extra token; siglip: `full`, none). Only used with an inline config; a pretrained encoder's "
        "family is read from its config.",
    )


class LLMConfig(PretrainedOrInline):
    type: Literal["llama", "qwen2"] = Field(
        "llama", description="Causal LM family for an inline config (ignored for `pretrained`)."
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer hub id / directory. Defaults to `pretrained`. With an inline LLM and no "
        "tokenizer, dsvlm builds a word-level tokenizer over the synthetic dataset's vocabulary.",
    )


class ModelConfig(Strict):
    vision: VisionConfig = Field(
        default_factory=lambda: VisionConfig(pretrained="openai/clip-vit-large-patch14-336"),
        description="Vision encoder (CLIP or SigLIP).",
    )
    llm: LLMConfig = Field(
        default_factory=lambda: LLMConfig(pretrained="lmsys/vicuna-7b-v1.5"),
        description="Causal language model.",
    )
    connector: Literal["mlp2x_gelu", "linear"] = Field(
        "mlp2x_gelu", description="Projector from vision features to the LLM's embedding space."
    )
    image_size: PositiveInt | None = Field(
        None,
        description="Input resolution of an inline encoder (overrides its config's image_size); a pretrained "
        "encoder keeps its own (a different value is an error).",
    )
    image_aspect_ratio: Literal["pad", "crop"] = Field(
        "pad",
        description="How a non-square image becomes the encoder's square input: `pad` centres it on the image "
        "processor's mean colour (LLaVA-1.5's pad-to-square), `crop` keeps its centre square. The diffusion "
        "target is the same square; evaluation applies it too (recorded in the model's config.json).",
    )
    vision_feature_layer: int = Field(
        -2, description="Encoder hidden state fed to the connector (LLaVA-1.5 uses the penultimate, -2)."
    )
    vision_feature_select_strategy: Literal["default", "full"] | None = Field(
        None, description="`default` drops the CLS token (CLIP), `full` keeps all (SigLIP). Derived if unset."
    )
    chat_template: Literal["vicuna", "chatml", "llama3", "dsvlm"] = Field(
        "vicuna",
        description="Conversation format of stage 2 (stage 1 uses the plain caption format). The eos token "
        "is set to this template's turn terminator.",
    )
    trust_remote_code: bool = Field(False, description="Allow hub code execution when loading. Off by default.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel for the encoder and LLM."
    )


LossName = Literal["perceptual", "mae", "ssim", "eps_mse"]


class DiffusionConfig(Strict):
    pretrained: str | None = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="Diffusers pipeline repo or directory holding `unet/`, `vae/` and `scheduler/` "
        "(only those are loaded; the text encoder never is).",
    )
    unet_config: dict[str, Any] | None = Field(
        None, description="Inline UNet2DConditionModel config (replaces the pretrained UNet)."
    )
    vae_config: dict[str, Any] | None = Field(
        None, description="Inline AutoencoderKL config (replaces the pretrained VAE)."
    )
    pixel_space: bool = Field(
        False,
        description="Diffuse in pixel space (identity autoencoder, no VAE). For tiny recipes where no "
        "pretrained VAE exists offline; image-space losses then compare pixels directly.",
    )
    num_train_timesteps: PositiveInt = Field(
        1000,
        description="Length of the default DDPM noise schedule, used when `pretrained` is null (a "
        "pretrained model brings its own scheduler/).",
    )


class SupervisionConfig(Strict):
    enabled: bool = Field(True, description="Add the diffusion reconstruction branch (False = plain LLaVA).")
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig, description="The diffusion model.")
    vision_layers: list[PositiveInt] = Field(
        default_factory=lambda: [8, 16, 24],
        description="Vision encoder layers (1-based hidden-state indices) whose states condition the UNet.",
    )
    connector: bool = Field(True, description="Also condition on the connector output (the 'text' branch).")
    cross_attention: Literal["moe", "shared", "shared_matched"] = Field(
        "moe",
        description="`moe`: one K/V branch per condition, mixed by a learned router per layer (paper). "
        "`shared`: all condition tokens concatenated into the original cross-attention (ablation; no new "
        "UNet parameters). `shared_matched`: `shared` with MoE's capacity [ours]: as many K/V pairs as "
        "conditions (copies of the original), each over all tokens, outputs averaged, no router.",
    )
    adapter: Literal["linear", "qformer"] = Field(
        "linear",
        description="Adapter from each condition to the UNet width: `linear` per token (paper), or `qformer`: "
        "`adapter_queries` learned queries cross-attending to the condition, then an MLP (adapter ablation).",
    )
    adapter_queries: PositiveInt = Field(16, description="Learned queries per condition of the `qformer` adapter.")
    loss: dict[LossName, PositiveFloat] = Field(
        default_factory=lambda: {"perceptual": 1.0},
        description="Reconstruction loss(es) and their weights, e.g. {perceptual: 1.0, mae: 0.5}.",
    )
    perceptual_network: Literal["vae_features", "vgg16"] = Field(
        "vae_features",
        description="Feature network of the LPIPS-style perceptual loss: `vae_features`, feature matching over "
        "the frozen VAE encoder's multi-scale features (always available, no download; not calibrated LPIPS), "
        "or `vgg16` (standard LPIPS features; needs `perceptual_weights`). `vae_encoder` is its old name.",
    )
    perceptual_weights: str | None = Field(
        None, description="Path to VGG16 feature weights (safetensors or a torchvision state dict)."
    )
    weight: float = Field(1.0, ge=0.0, description="λ in L = L_text + λ·L_rec.")
    timestep_range: tuple[int, int] = Field(
        (0, 999),
        description="Inclusive range of the uniformly sampled diffusion timesteps (a lower maximum "
        "keeps image-space losses off images decoded from near-pure noise).",
    )
    timestep_weighting: Literal["none", "min_snr"] = Field(
        "none",
        description="Per-sample loss weight by noise level [ours]: `min_snr` weights eps_mse by "
        "min(SNR, γ)/SNR and the image-space losses (on x̂0) by min(SNR, γ)/γ (Min-SNR, Hang et al. 2023).",
    )
    min_snr_gamma: PositiveFloat = Field(5.0, description="γ of `min_snr` weighting.")
    x0_clamp: PositiveFloat | None = Field(
        None,
        description="Clamp the one-step x̂0 to [-c, c] before decoding [ours] (1.0 in pixel space; SD latents "
        "are roughly unit-scaled): bounds the ~1/sqrt(ᾱ) amplification of the ε error at high t.",
    )
    resolution: PositiveInt = Field(256, description="Image resolution fed to the VAE / UNet.")
    freeze_unet: bool = Field(
        True, description="Keep the UNet frozen (paper). A tiny random UNet must train along (False)."
    )
    lora_rank: int | None = Field(
        None, ge=1, description="If set, LoRA of this rank on the UNet's attention projections (trainable)."
    )
    reconstruct_per_batch: PositiveInt | None = Field(
        None, description="Images per device batch the branch reconstructs (None = all). The cost lever."
    )
    sampler_steps: PositiveInt = Field(50, description="DDIM steps of the preview sampler.")

    @field_validator("perceptual_network", mode="before")
    @classmethod
    def _renamed_network(cls, value: Any) -> Any:
        # Runs saved before the rename carry the old name in their recipe.yaml; they must still load.
        if value == "vae_encoder":
            _warn_renamed("supervision.perceptual_network", "vae_encoder", "vae_features")
            return "vae_features"
        return value

    @field_validator("vision_layers")
    @classmethod
    def _unique_layers(cls, layers: list[int]) -> list[int]:
        if len(set(layers)) != len(layers):
            raise ValueError(f"vision layers must be unique, got {layers}")
        return layers

    @model_validator(mode="after")
    def _check(self) -> SupervisionConfig:
        lo, hi = self.timestep_range
        if not 0 <= lo <= hi:
            raise ValueError(f"timestep_range must satisfy 0 <= low <= high, got {self.timestep_range}")
        if self.enabled and not self.loss:
            raise ValueError("supervision.loss needs at least one loss")
        if self.enabled and not (self.connector or self.vision_layers):
            raise ValueError("supervision needs a condition: set connector: true or some vision_layers")
        if (
            self.enabled
            and self.diffusion.pixel_space
            and self.perceptual_network == "vae_features"
            and ("perceptual" in self.loss)
        ):
            raise ValueError("the `perceptual` loss over `vae_features` needs a VAE (pixel_space: false)")
        if self.perceptual_network == "vgg16" and "perceptual" in self.loss and not self.perceptual_weights:
            raise ValueError("perceptual_network vgg16 needs perceptual_weights (a local weights file)")
        return self


class DataConfig(Strict):
    dataset: str = Field("data/synthetic", description="Prepared dataset directory (the output of `dsvlm prepare`).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    use_latent_cache: bool = Field(
        True, description="Read precomputed VAE latents when the dataset has a matching cache."
    )
    group_by_length: bool = Field(
        False,
        description="Per epoch, fill each global batch with records of one modality (image or text-only) "
        "and similar length (LLaVA's group_by_modality_length): less padding; the order stays seeded and resumable.",
    )
    max_length: PositiveInt = Field(2048, description="Truncate tokenised conversations to this length.")


class LLMLoraConfig(Strict):
    """LoRA on the LLM's linear layers (peft); the defaults are LLaVA-1.5's `-lora` scripts."""

    rank: PositiveInt = Field(128, description="LoRA rank r (LLaVA-1.5 -lora: 128).")
    alpha: PositiveFloat = Field(256.0, description="LoRA alpha: updates are scaled by alpha / rank (LLaVA-1.5: 256).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch's input (LLaVA-1.5: 0.05).")
    lr: PositiveFloat | None = Field(
        None,
        description="Learning rate of the adapters (LLaVA-1.5 -lora: 2e-4 while its projector takes 2e-5); "
        "default the stage's lr.",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Names of the linear layers inside the LLM that get LoRA (default: the attention and MLP "
        "projections, as LLaVA-1.5's find_all_linear_names gives for Llama/Qwen2). The vision tower, the "
        "connector and lm_head never do.",
    )


class StageConfig(Strict):
    name: StageName = Field(..., description="`align` (stage 1, captions) or `instruct` (stage 2, chat).")
    split: str | None = Field(None, description="Split of the prepared dataset to train on (default: name).")
    dataset: str | None = Field(None, description="Override data.dataset for this stage.")
    template: Literal["plain", "chat"] | None = Field(
        None, description="Prompt format; default plain for align, chat for instruct."
    )
    train: list[ModuleName] = Field(
        ..., min_length=1, description="Modules trained in this stage (the rest are frozen)."
    )
    supervision: bool = Field(True, description="Apply the diffusion loss in this stage.")
    lr: PositiveFloat = Field(..., description="Peak learning rate.")
    new_module_lr: PositiveFloat | None = Field(
        None, description="Learning rate of new modules (adapters, new K/V, routers); default lr."
    )
    global_batch_size: PositiveInt = Field(..., description="Samples per optimizer step over all devices.")
    per_device_batch_size: PositiveInt = Field(..., description="Samples per forward pass per device.")
    epochs: PositiveFloat = Field(1.0, description="Passes over the split (ignored when max_steps is set).")
    max_steps: PositiveInt | None = Field(None, description="Stop after this many optimizer steps.")
    max_records: PositiveInt | None = Field(
        None,
        description="Train on a fixed subset of this many records of the split (None = all), e.g. for a "
        "low-instruction-data regime. The subset is seeded by the split name, not run.seed: every seed and arm "
        "trains on the same records, and a smaller subset lies inside a larger one.",
    )
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Fraction of steps of linear warmup.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping norm (None = off).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="Mixed precision.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations of the LLM and encoder.")
    group_by_length: bool | None = Field(
        None,
        description="Override data.group_by_length for this stage (LLaVA-1.5 groups its instruction tuning only).",
    )
    llm_lora: LLMLoraConfig | None = Field(
        None,
        description="Train the LLM through LoRA adapters instead of all its weights (needs `llm` in train): only "
        "the adapters of the LLM learn (embeddings and lm_head stay frozen). The stage output keeps them beside "
        "the base weights (final/llm_lora); `dsvlm strip` merges them into a plain LLaVA.",
    )

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        if self.global_batch_size % self.per_device_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by "
                f"per_device_batch_size {self.per_device_batch_size}"
            )
        if self.llm_lora is not None and "llm" not in self.train:
            raise ValueError(f"llm_lora (LoRA on the LLM) needs `llm` in train, got train {self.train}")
        if self.max_records is not None and self.max_records < self.global_batch_size:
            raise ValueError(
                f"max_records {self.max_records} is smaller than one global batch ({self.global_batch_size})"
            )
        return self

    @property
    def split_name(self) -> str:
        return self.split or self.name

    @property
    def template_name(self) -> str:
        return self.template or ("plain" if self.name == "align" else "chat")

    def accumulation_steps(self, world_size: int) -> int:
        """Gradient accumulation that makes per-device x accumulation x world size = global batch."""
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size % per_step:
            # Known only at launch (the world size), so a RecipeError of its own rather than a validation error.
            raise RecipeError(
                f"stage {self.name}: global_batch_size {self.global_batch_size} is not divisible by "
                f"per_device_batch_size {self.per_device_batch_size} x {world_size} processes; set "
                f"stages.N.per_device_batch_size to a divisor of {self.global_batch_size // world_size or 1}"
                if self.global_batch_size % world_size == 0
                else f"stage {self.name}: global_batch_size {self.global_batch_size} is not divisible by the "
                f"{world_size} launched processes"
            )
        return self.global_batch_size // per_step


class RunConfig(Strict):
    output_dir: str = Field("runs/dsvlm", description="Run directory (recipe, metrics, checkpoints, outputs).")
    seed: int = Field(0, description="Seed of weights init, data order and diffusion noise.")
    checkpoint_every: PositiveInt = Field(500, description="Optimizer steps between checkpoints.")
    keep_checkpoints: PositiveInt = Field(2, description="How many recent checkpoints to keep.")
    log_every: PositiveInt = Field(
        10,
        description="With the progress bar off (`--no-progress`), log a metrics line to stderr every this many "
        "optimizer steps. metrics.jsonl (and TensorBoard) record every step.",
    )
    preview_every: int = Field(
        0, ge=0, description="Optimizer steps between reconstruction-grid PNGs (0 = only at stage end)."
    )
    preview_images: PositiveInt = Field(4, description="Images in a reconstruction grid.")
    tensorboard: bool = Field(
        False,
        description="Also log every step's metrics to TensorBoard, in OUT/tensorboard/<stage>/ (needs the "
        "tensorboard package: pip install 'dsvlm[tensorboard]').",
    )
    peak_tflops: PositiveFloat | None = Field(
        None,
        description="Peak TFLOP/s of one device for the `mfu` metric (default: known GPUs' dense bf16 peak; "
        "none on CPU).",
    )


class EvalConfig(Strict):
    """Defaults of `dsvlm eval` for a run of this recipe (or with `--recipe`) and of `dsvlm ablate`; the
    command line's flags win."""

    benchmarks: list[str] = Field(
        default_factory=lambda: ["mmbench"], description="Benchmarks run when `--bench` is not given."
    )
    batch_size: PositiveInt = Field(8, description="Generation batch size.")
    max_new_tokens: PositiveInt | None = Field(
        None, description="Cap on every task's generation length (None = each task's own setting)."
    )
    limit: PositiveInt | None = Field(None, description="Evaluate only the first N items of each benchmark.")
    data_files: dict[str, str] = Field(
        default_factory=dict,
        description="Benchmark -> local copy (a parquet file, or a prepared dataset folder), for offline runs. "
        "`synthetic` defaults to data.dataset.",
    )


class AblateConfig(Strict):
    """A controlled comparison (`dsvlm ablate`): named arms of recipe overrides x seeds."""

    arms: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Arm name -> recipe overrides `key.sub=value` (in order); the baseline arm may have none.",
    )
    baseline: str | None = Field(None, description="The arm the others are compared with (default: the first).")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="run.seed of each cell of an arm.")
    benchmarks: list[str] | None = Field(None, description="Benchmarks of every cell (default: eval.benchmarks).")
    probe: bool = Field(True, description="Also probe each cell's visual features (`dsvlm probe`).")
    probe_train: PositiveInt = Field(1024, description="Probe training images per scene set.")
    probe_test: PositiveInt = Field(512, description="Held-out probe images per scene set.")
    probe_steps: PositiveInt = Field(100, description="L-BFGS iterations of each probe.")
    bootstrap: PositiveInt = Field(2000, description="Bootstrap resamples of the paired confidence intervals.")
    output_dir: str = Field("runs/ablate", description="Grid directory: OUT/cells/ARM/seed-S/, OUT/report.*.")


class Recipe(Strict):
    """A complete DS-VLM recipe: model, diffusion supervision, data, stages, run and eval settings."""

    description: str = Field("", description="One line shown by `dsvlm recipe list`.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The LLaVA VLM.")
    supervision: SupervisionConfig = Field(
        default_factory=SupervisionConfig, description="The diffusion supervision branch (training only)."
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Prepared data.")
    stages: list[StageConfig] = Field(..., min_length=1, description="Training stages, run in order.")
    run: RunConfig = Field(default_factory=RunConfig, description="Run directory, seed, checkpoints, logs.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation defaults.")
    ablate: AblateConfig | None = Field(None, description="Arms and seeds of `dsvlm ablate` (ignored by train).")

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage name used twice: {', '.join(dupes)}")
        for i, stage in enumerate(self.stages):
            if not self.supervision.enabled and "supervision" in stage.train:
                # `supervision.enabled=false` alone must give the plain LLaVA baseline of any recipe.
                kept = [module for module in stage.train if module != "supervision"]
                if not kept:
                    raise ValueError(
                        f"stages.{i} ({stage.name}) trains only `supervision` but supervision.enabled is false"
                    )
                log.info("supervision is disabled: stage %s no longer trains `supervision`", stage.name)
                stage.train = kept
        depth = vision_depth(self.model.vision)
        if self.supervision.enabled and depth is not None:
            too_deep = [layer for layer in self.supervision.vision_layers if layer > depth]
            if too_deep:
                raise ValueError(
                    f"supervision.vision_layers {too_deep} exceed the vision encoder's depth ({depth} layers)"
                )
        return self

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def vision_depth(vision: VisionConfig) -> int | None:
    """Number of encoder layers when the recipe states it (inline config), else None."""
    if vision.config is not None:
        return int(vision.config.get("num_hidden_layers", 12))
    return None
