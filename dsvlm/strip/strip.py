"""Drop the diffusion branch and write a standard transformers LLaVA directory, verified before it lands."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from transformers import GenerationConfig, LlavaForConditionalGeneration

from dsvlm.errors import DsvlmError, RunFailure
from dsvlm.io import atomic_dir
from dsvlm.model.dsvlm import DSVLM, branch_parameters, load_vlm
from dsvlm.model.lora import has_llm_lora, merge_llm_lora
from dsvlm.outputs import STRIPPED_MODEL, check_output, write_marker, writer_lock
from dsvlm.recipe.load import read_yaml, validate_recipe
from dsvlm.rundir import STAGE_INFO, STRIPPED, resolve_init
from dsvlm.strip.card import model_card

log = logging.getLogger(__name__)

# What tools that load plain LLaVA checkpoints (lmms-eval llava_hf, vLLM) accept; vLLM refuses anything else.
# transformers 5 saves LLaVA in the classic layout (`language_model.model.*`, `vision_tower.*`, ...).
LLAVA_PREFIXES = ("vision_tower.", "multi_modal_projector.", "language_model.", "lm_head.")
# Logit tolerance of the verification: a copy must match exactly (up to float noise); a merged LoRA adapter
# computes W x + s·B(A x) as (W + s·B A) x, a different rounding in every adapted layer.
EXACT_TOLERANCE = 1e-5
MERGE_TOLERANCE = 1e-4


@dataclass
class StripReport:
    source: str
    output: str
    params_before: int
    params_after: int
    params_removed: int
    bytes_before: int
    bytes_after: int
    max_logit_diff: float


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def load_trained(source: Path) -> tuple[Path, DSVLM]:
    """The VLM of a run or stage output, without its branch: strip drops it anyway, and building it would
    read (or download) the diffusion model's weights. A LoRA stage's adapter is in the LLM, not yet merged."""
    final = resolve_init(source)
    recipe_file = final / "recipe.yaml"
    if not recipe_file.is_file():
        raise DsvlmError(f"{final} has no recipe.yaml: it was not written by `dsvlm train`")
    recipe = validate_recipe(read_yaml(recipe_file), source=str(recipe_file))
    try:
        model = load_vlm(final, recipe, merge_lora=False)
    except (OSError, ValueError, KeyError) as exc:
        raise DsvlmError(f"{final} is incomplete or corrupt, it does not load: {exc}") from exc
    return final, model.eval()


def probe_batch(model: DSVLM) -> dict[str, torch.Tensor]:
    """A fixed image + prompt, the same for the training and the stripped model."""
    processor = model.processor
    size = processor.image_processor.crop_size if hasattr(processor.image_processor, "crop_size") else None
    side = (size or {}).get("height") or model.vlm.config.vision_config.image_size
    pixels = np.random.default_rng(0).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    content = [{"type": "image"}, {"type": "text", "text": "what colour is the shape ?"}]
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[prompt], images=[Image.fromarray(pixels)], return_tensors="pt")


def strip(source: Path, out: Path, overwrite: bool = False) -> StripReport:
    """Write the plain LLaVA of `source` to `out` (atomically) and verify it loads and matches.

    `overwrite` replaces an earlier stripped model at `out`, never anything else (see `check_output`).
    """
    out = Path(out)
    with writer_lock(out):
        check_output(out, STRIPPED_MODEL, overwrite, sources=(source, resolve_init(Path(source))))
        final, model = load_trained(Path(source))
        batch = probe_batch(model)
        with torch.no_grad():
            expected = model.vlm(**batch).logits  # with a LoRA adapter: unmerged, so verify checks the merge too
        merged = has_llm_lora(model.vlm)
        if merged:
            merge_llm_lora(model.vlm)
        params_after = sum(p.numel() for p in model.vlm.parameters())
        params_before = params_after + branch_parameters(final)
        with atomic_dir(out, replace=True) as tmp:
            model.vlm.save_pretrained(tmp, safe_serialization=True)
            model.processor.save_pretrained(tmp)
            tokenizer = model.processor.tokenizer
            GenerationConfig(
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                do_sample=False,
            ).save_pretrained(tmp)
            stages = _stage_infos(final)
            (tmp / "README.md").write_text(model_card(final, stages, params_after))
            max_diff = verify(tmp, batch, expected, tolerance=MERGE_TOLERANCE if merged else EXACT_TOLERANCE)
            write_marker(tmp, STRIPPED_MODEL)
    report = StripReport(
        str(final),
        str(out),
        params_before,
        params_after,
        params_before - params_after,
        dir_bytes(final),
        dir_bytes(out),
        max_diff,
    )
    log.info(
        "stripped %s -> %s: removed %d parameters (%d -> %d), %.1f MB -> %.1f MB",
        final,
        out,
        report.params_removed,
        params_before,
        params_after,
        report.bytes_before / 1e6,
        report.bytes_after / 1e6,
    )
    return report


def stripped_model(path: Path) -> Path:
    """`path` itself, or for a training run / stage output its stripped model in RUN/<stage>/stripped,
    written on first use and again when the stage output is newer: what `dsvlm eval` and `dsvlm probe` accept."""
    path = Path(path).expanduser()
    if not path.is_dir() or (path / "config.json").is_file():
        return path  # a model directory (or nothing): the evaluator's own checks explain what is wrong
    try:
        final = resolve_init(path)
    except DsvlmError:
        return path
    stripped = final.parent / STRIPPED
    done = stripped / "config.json"
    if not done.is_file() or done.stat().st_mtime < (final / STAGE_INFO).stat().st_mtime:
        log.info("%s is a training run: stripping %s into %s", path, final, stripped)
        strip(final, stripped, overwrite=True)
    return stripped.resolve()


def verify(
    directory: Path, batch: dict[str, torch.Tensor], expected: torch.Tensor, tolerance: float = EXACT_TOLERANCE
) -> float:
    """The output loads with no missing/unexpected keys, holds only LLaVA tensors, and gives the same logits."""
    stray = []
    for shard in directory.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names = list(f.keys())  # safe_open is not a dict: `in f` does not work
        stray += [k for k in names if not k.startswith(LLAVA_PREFIXES)]
    if stray:
        raise RunFailure(f"strip verification failed: non-LLaVA tensors in the output: {stray[:5]}")
    loaded, info = LlavaForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise RunFailure(f"strip verification failed: the output does not load cleanly: {problems}")
    with torch.no_grad():
        logits = loaded.eval()(**batch).logits
    diff = float((logits - expected).abs().max())
    if not torch.allclose(logits, expected, atol=tolerance, rtol=tolerance):
        raise RunFailure(f"strip verification failed: logits differ from the training model (max {diff:.3g})")
    return diff


def _stage_infos(final: Path) -> list[dict]:
    """stage.json of every finished stage of the run, in run order."""
    run = final.parent.parent
    infos = [json.loads(p.read_text()) for p in run.glob(f"*/final/{STAGE_INFO}")]
    return sorted(infos, key=lambda i: i.get("finished", "")) or [json.loads((final / STAGE_INFO).read_text())]


def push_to_hub(directory: Path, repo_id: str, private: bool = False) -> str:
    """Upload a stripped directory; fails at once (no retries) when the hub cannot be reached."""
    from huggingface_hub import HfApi, is_offline_mode

    if is_offline_mode():
        raise DsvlmError(
            f"cannot push to {repo_id}: the hub is offline (HF_HUB_OFFLINE=1); the model is in "
            f"{directory}, upload it later with `hf upload {repo_id} {directory}`"
        )
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        return str(
            api.upload_folder(repo_id=repo_id, folder_path=str(directory), ignore_patterns=[STRIPPED_MODEL.marker])
        )
    except Exception as exc:  # network and auth errors all end the same way for the user
        raise DsvlmError(f"cannot push to {repo_id}: {exc}") from exc
