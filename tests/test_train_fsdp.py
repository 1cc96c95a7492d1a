"""Sharded training on 2 CPU processes (gloo) through accelerate: FSDP2, and DeepSpeed ZeRO-2 where deepspeed is
installed. Previews, checkpoints and the final save with every rank taking part, the result equal to one process
at the same global batch, and `--resume` from a sharded checkpoint equal to the uninterrupted sharded run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import REPO, cli, launch, prepare_small_synthetic, tiny_overrides
from test_train import assert_same_weights

pytestmark = pytest.mark.slow


def cpu_config(shipped: str, port: int) -> str:
    """A bundled accelerate config (recipes/accelerate/) on 2 CPU processes; everything else as shipped. fp32:
    the comparison with one process is exact there."""
    config = yaml.safe_load((REPO / "recipes" / "accelerate" / shipped).read_text())
    config.update(num_processes=2, use_cpu=True, main_process_port=port, mixed_precision="no")
    return yaml.safe_dump(config)


# Every image reconstructed: a per-device sub-batch limit would differ between the two layouts.
COMMON = ["supervision.reconstruct_per_batch=null", "run.preview_every=2", "--stage", "align", "--no-progress"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, final output of one process with global batch 8 in one micro-batch)."""
    root = tmp_path_factory.mktemp("single")
    data = prepare_small_synthetic(root / "data", n=32)
    cli("train", "tiny-synthetic", *tiny_overrides(data, root / "run", steps=3), *COMMON, check=True)  # in process
    return data, root / "run" / "align" / "final"


def _sharded_run_matches_one_process_and_resumes(
    single: tuple[Path, Path], tmp_path: Path, accelerate_config: str, distributed: str
) -> None:
    data, single_final = single
    config = tmp_path / "accelerate.yaml"
    config.write_text(accelerate_config)
    sharded = tmp_path / "sharded"
    args = ["train", "tiny-synthetic", *tiny_overrides(data, sharded, steps=3), "stages.0.per_device_batch_size=4"]
    launcher = ["accelerate.commands.launch", "--config_file", str(config)]
    launch(launcher, *args, *COMMON)
    final = sharded / "align" / "final"
    info = json.loads((final / "stage.json").read_text())
    assert info["world_size"] == 2 and info["distributed"] == distributed
    assert (sharded / "align" / "previews" / "step-0000002.png").is_file()
    assert (sharded / "align" / "reconstructions.png").is_file()
    assert (sharded / "align" / "checkpoints" / "step-0000002" / "trainer_state.json").is_file()
    assert_same_weights(single_final, final, atol=2e-5)

    # A crash after the step-2 checkpoint: the stage output is gone, --resume loads the sharded checkpoint (model,
    # optimizer, scheduler, RNG on both ranks) and redoes step 3.
    uninterrupted = tmp_path / "uninterrupted"
    shutil.move(final, uninterrupted)
    resumed = launch(launcher, *args, *COMMON, "--resume")
    assert "resumed from" in resumed.stderr and "skipping" not in resumed.stderr
    assert_same_weights(uninterrupted, final, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (sharded / "align" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_fsdp_on_two_processes_matches_one_process_and_resumes(single, tmp_path):
    _sharded_run_matches_one_process_and_resumes(single, tmp_path, cpu_config("fsdp.yaml", 29547), "FSDP")


def test_deepspeed_zero2_on_two_processes_matches_one_process_and_resumes(single, tmp_path):
    # Not a dsvlm dependency; on CPU its gloo collectives JIT-build a small C++ op once (needs a compiler).
    pytest.importorskip("deepspeed")
    _sharded_run_matches_one_process_and_resumes(
        single, tmp_path, cpu_config("deepspeed_zero2.yaml", 29548), "DEEPSPEED"
    )
