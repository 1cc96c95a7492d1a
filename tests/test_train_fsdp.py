"""Sharded training on 2 CPU processes (gloo) through accelerate: FSDP2, and DeepSpeed ZeRO-2 where deepspeed is
installed. Previews, checkpoints and the final save with every rank taking part, the result equal to one process
at the same global batch, and `--resume` from a sharded checkpoint equal to the uninterrupted sharded run. FSDP
with LoRA on the LLM (a stage's `llm_lora`) too: the adapter saved, resumed and merged by strip as in one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import REPO, cli, launch, prepare_small_synthetic, tiny_overrides
from safetensors.torch import load_file
from test_train import assert_same_weights

pytestmark = pytest.mark.slow


def cpu_config(shipped: str, port: int) -> str:
    """A bundled accelerate config (recipes/accelerate/) on 2 CPU processes; everything else as shipped. fp32:
    the comparison with one process is exact there."""
    config = yaml.safe_load((REPO / "recipes" / "accelerate" / shipped).read_text())
    config.update(num_processes=2, use_cpu=True, main_process_port=port, mixed_precision="no")
    return yaml.safe_dump(config)


# Every image reconstructed: a per-device sub-batch limit would differ between the two layouts.
COMMON = ["supervision.reconstruct_per_batch=null", "run.preview_every=2", "--no-progress"]
# Stage 2 from the base weights (no stage 1 run), the LLM through LoRA; no dropout, whose masks differ per rank.
LLM_LORA = ["stages.1.llm_lora={rank: 4, alpha: 8, dropout: 0.0}", "stages.1.train=[connector, llm, supervision]"]


def _single_run(root: Path, stage: str, overrides: list[str]) -> tuple[Path, Path]:
    """(dataset, final output of one process with global batch 8 in one micro-batch)."""
    data = prepare_small_synthetic(root / "data", n=32)
    args = [*tiny_overrides(data, root / "run", steps=3), *overrides, *COMMON, "--stage", stage]
    cli("train", "tiny-synthetic", *args, check=True)  # in process
    return data, root / "run" / stage / "final"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, Path]:
    return _single_run(tmp_path_factory.mktemp("single"), "align", [])


@pytest.fixture(scope="module")
def single_lora(tmp_path_factory) -> tuple[Path, Path]:
    return _single_run(tmp_path_factory.mktemp("single-lora"), "instruct", LLM_LORA)


def _sharded_run_matches_one_process_and_resumes(
    single: tuple[Path, Path],
    tmp_path: Path,
    accelerate_config: str,
    distributed: str,
    stage: str = "align",
    overrides: tuple[str, ...] = (),
) -> Path:
    """The sharded run's final output (after its resume)."""
    data, single_final = single
    config = tmp_path / "accelerate.yaml"
    config.write_text(accelerate_config)
    sharded = tmp_path / "sharded"
    index = 0 if stage == "align" else 1
    args = [
        "train",
        "tiny-synthetic",
        *tiny_overrides(data, sharded, steps=3),
        f"stages.{index}.per_device_batch_size=4",
        *overrides,
        *COMMON,
        "--stage",
        stage,
    ]
    launcher = ["accelerate.commands.launch", "--config_file", str(config)]
    launch(launcher, *args)
    final = sharded / stage / "final"
    info = json.loads((final / "stage.json").read_text())
    assert info["world_size"] == 2 and info["distributed"] == distributed
    assert (sharded / stage / "previews" / "step-0000002.png").is_file()
    assert (sharded / stage / "reconstructions.png").is_file()
    assert (sharded / stage / "checkpoints" / "step-0000002" / "trainer_state.json").is_file()
    assert_same_weights(single_final, final, atol=2e-5)

    # A crash after the step-2 checkpoint: the stage output is gone, --resume loads the sharded checkpoint (model,
    # optimizer, scheduler, RNG on both ranks) and redoes step 3.
    uninterrupted = tmp_path / "uninterrupted"
    shutil.move(final, uninterrupted)
    resumed = launch(launcher, *args, "--resume")
    assert "resumed from" in resumed.stderr and "skipping" not in resumed.stderr
    assert_same_weights(uninterrupted, final, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (sharded / stage / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    return final


def test_fsdp_on_two_processes_matches_one_process_and_resumes(single, tmp_path):
    _sharded_run_matches_one_process_and_resumes(single, tmp_path, cpu_config("fsdp.yaml", 29547), "FSDP")


def test_deepspeed_zero2_on_two_processes_matches_one_process_and_resumes(single, tmp_path):
    # Not a dsvlm dependency; on CPU its gloo collectives JIT-build a small C++ op once (needs a compiler).
    pytest.importorskip("deepspeed")
    _sharded_run_matches_one_process_and_resumes(
        single, tmp_path, cpu_config("deepspeed_zero2.yaml", 29548), "DEEPSPEED"
    )


def test_fsdp_with_llm_lora_matches_one_process_resumes_and_strips(single_lora, tmp_path):
    final = _sharded_run_matches_one_process_and_resumes(
        single_lora, tmp_path, cpu_config("fsdp.yaml", 29549), "FSDP", "instruct", tuple(LLM_LORA)
    )  # the weights compared include the adapter (final/llm_lora), as one process saves it
    single_final = single_lora[1]
    for output in (single_final, final):
        assert (output / "llm_lora" / "adapter_config.json").is_file()
        assert not any("lora_" in k or "base_layer" in k for k in load_file(output / "vlm" / "model.safetensors"))
    adapter = load_file(final / "llm_lora" / "adapter_model.safetensors")
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained: B starts at zero

    # strip merges the sharded run's adapter (verified against its unmerged logits) into the same plain LLaVA as
    # the one-process run's.
    for output, stripped in ((single_final, tmp_path / "strip-single"), (final, tmp_path / "strip-sharded")):
        cli("strip", output, "--out", stripped, check=True)
        assert not any("lora_" in k or "base_layer" in k for k in load_file(stripped / "model.safetensors"))
    assert_same_weights(tmp_path / "strip-single", tmp_path / "strip-sharded", atol=2e-5)
