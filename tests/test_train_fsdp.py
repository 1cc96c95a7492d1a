"""FSDP (accelerate, FSDP2) on 2 CPU processes: previews, checkpoints and the final save with every rank taking
part, the result equal to one process at the same global batch, and `--resume` from a sharded checkpoint equal to
the uninterrupted sharded run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, dsvlm, prepare_small_synthetic, tiny_overrides
from test_train import assert_same_weights

pytestmark = pytest.mark.slow

FSDP_CPU = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: "no"
use_cpu: true
main_process_port: 29547
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_reshard_after_forward: true
  fsdp_activation_checkpointing: false
"""


def test_fsdp_on_two_processes_matches_one_process_and_resumes(tmp_path):
    data = prepare_small_synthetic(tmp_path / "data", n=32)
    # Every image reconstructed: a per-device sub-batch limit would differ between the two layouts.
    common = ["supervision.reconstruct_per_batch=null", "run.preview_every=2", "--stage", "align", "--no-progress"]
    single = tmp_path / "single"
    dsvlm("train", "tiny-synthetic", *tiny_overrides(data, single, steps=3), *common)

    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CPU)
    sharded = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "dsvlm",
           "train", "tiny-synthetic", *tiny_overrides(data, sharded, steps=3),
           "stages.0.per_device_batch_size=4", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    final = sharded / "align" / "final"
    info = json.loads((final / "stage.json").read_text())
    assert info["world_size"] == 2 and info["distributed"] == "FSDP"
    assert (sharded / "align" / "previews" / "step-0000002.png").is_file()
    assert (sharded / "align" / "reconstructions.png").is_file()
    assert (sharded / "align" / "checkpoints" / "step-0000002" / "trainer_state.json").is_file()
    assert_same_weights(single / "align" / "final", final, atol=2e-5)

    # A crash after the step-2 checkpoint: the stage output is gone, --resume loads the sharded checkpoint (model,
    # optimizer, scheduler, RNG on both ranks) and redoes step 3.
    uninterrupted = tmp_path / "uninterrupted"
    shutil.move(final, uninterrupted)
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-0000002" in resumed.stderr
    assert_same_weights(uninterrupted, final, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (sharded / "align" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

