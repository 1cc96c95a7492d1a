"""Resume is trustworthy: corrupt checkpoints are listed, never half applied; torn metrics and the temporaries
of killed processes do not block the next run. Library-level, on a tiny torch model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from helpers import tiny_overrides

from dsvlm.errors import DsvlmError
from dsvlm.outputs import RUN, write_marker
from dsvlm.plots import read_metrics
from dsvlm.recipe import load_recipe
from dsvlm.rundir import RunDir
from dsvlm.train import checkpoint
from dsvlm.train.loop import _append_metrics


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


@pytest.fixture
def prepared():
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    yield accelerator, model, optimizer
    AcceleratorState._reset_state()


def train_step(model, optimizer) -> None:
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_when_every_checkpoint_fails_the_error_lists_each_and_nothing_is_applied(prepared, tmp_path):
    accelerator, model, optimizer = prepared
    for step in (1, 2):
        train_step(model, optimizer)
        checkpoint.save_checkpoint(accelerator, tmp_path, step, {}, keep=3)
    # step 2 has good weights but a corrupt optimizer; step 1 a truncated model
    (tmp_path / "step-0000002" / "optimizer.bin").write_bytes(b"garbage")
    weights = tmp_path / "step-0000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with torch.no_grad():
        model.weight.fill_(7.0)
    with pytest.raises(DsvlmError) as err:
        checkpoint.load_latest(accelerator, tmp_path)
    message = str(err.value)
    assert "no checkpoint in" in message and "--overwrite" in message
    assert "step-0000002: " in message and "step-0000001: " in message
    assert torch.all(model.weight == 7.0)  # step 2's readable weights were not applied on their own


def test_a_good_older_checkpoint_is_used_after_a_corrupt_newer_one(prepared, tmp_path):
    accelerator, model, optimizer = prepared
    train_step(model, optimizer)
    checkpoint.save_checkpoint(accelerator, tmp_path, 1, {}, keep=3)
    saved = model.weight.detach().clone()
    train_step(model, optimizer)
    checkpoint.save_checkpoint(accelerator, tmp_path, 2, {}, keep=3)
    (tmp_path / "step-0000002" / "optimizer.bin").write_bytes(b"garbage")
    assert checkpoint.load_latest(accelerator, tmp_path)["step"] == 1
    torch.testing.assert_close(model.weight, saved)


def test_ctrl_c_during_a_checkpoint_write_leaves_no_temporary(prepared, tmp_path, monkeypatch):
    accelerator = prepared[0]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(accelerator, "save_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(accelerator, tmp_path, 1, {}, keep=3)
    assert list(tmp_path.iterdir()) == []


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [m["step"] for m in read_metrics(path)] == [1, 2]
    assert "torn last line 3" in caplog.text
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(DsvlmError, match="line 2 is not JSON"):
        read_metrics(path)


def test_a_full_disk_while_writing_metrics_is_one_clean_error(tmp_path):
    with pytest.raises(DsvlmError, match="could not write the metrics /dev/full: No space left"):
        _append_metrics(Path("/dev/full"), {"step": 1}, tmp_path)


def test_the_next_run_removes_what_killed_processes_left(tmp_path):
    out = tmp_path / "run"
    dead, live = dead_pid(), os.getppid()
    leftovers = [
        out / "align" / f".final.tmp-{dead}",
        out / "align" / f".final.old-{dead}",
        out / "align" / "checkpoints" / ".step-0000004.tmp",
    ]
    for directory in leftovers:
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(b"partial")
    (out / f".env.json.tmp-{dead}").write_text("{")
    write_marker(out, RUN)  # the run they were writing
    kept = out / "align" / f".final.tmp-{live}"  # a live process's temporary is its own
    kept.mkdir()
    recipe = load_recipe("tiny-synthetic", tiny_overrides(tmp_path / "data", out))
    RunDir.open(out, recipe, ["align"], resume=True, overwrite=False)
    assert not any(p.exists() for p in leftovers) and not (out / f".env.json.tmp-{dead}").exists()
    assert kept.is_dir()
    assert sorted(p.name for p in (out / "align").iterdir()) == [f".final.tmp-{live}", "checkpoints"]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_checking_a_hostile_checkpoint_runs_no_code(prepared, tmp_path):
    accelerator, model, optimizer = prepared
    train_step(model, optimizer)
    checkpoint.save_checkpoint(accelerator, tmp_path / "ckpt", 1, {}, keep=3)
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker)}, tmp_path / "ckpt" / "step-0000001" / "optimizer.bin")
    with pytest.raises(DsvlmError, match="step-0000001: "):
        checkpoint.load_latest(accelerator, tmp_path / "ckpt")
    assert not marker.exists()


def test_deepspeed_engine_files_are_checked_whole_without_unpickling(tmp_path):
    """DeepSpeed pickles its own objects (no weights-only load): its files are checked by their archive CRCs."""
    import argparse
    import zipfile

    engine = tmp_path / "step-0000001" / "pytorch_model"
    engine.mkdir(parents=True)
    (engine.parent / "latest").write_text("pytorch_model")
    states = engine / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(64)}, "ds_config": argparse.Namespace(zero_stage=2)}, states)
    checkpoint._check_readable(engine.parent)
    whole = states.read_bytes()
    states.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(zipfile.BadZipFile):
        checkpoint._check_readable(engine.parent)
