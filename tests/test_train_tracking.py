"""What a training run reports while it runs: metrics.jsonl every step, a stderr line every `run.log_every`
steps without the progress bar, and with `run.tensorboard` the same numbers in TensorBoard event files."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsvlm.cli.app import app
from dsvlm.data.synthetic import SyntheticConfig, prepare_synthetic

STEPS = 4


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    """tiny-synthetic without the diffusion branch (no diffusion model to build): one small stage."""
    return [
        f"data.dataset={data}",
        f"run.output_dir={out}",
        "supervision.enabled=false",
        f"stages.0.max_steps={STEPS}",
        "stages.0.global_batch_size=4",
        "stages.0.per_device_batch_size=4",
        "run.checkpoint_every=100",
        *extra,
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare_synthetic(out, SyntheticConfig(n_align=8, n_instruct=4, n_eval=2), progress=False)
    return out


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> tuple[Path, str]:
    """A 4-step run with log_every 2, without the progress bar, with TensorBoard; its directory and stderr."""
    out = tmp_path_factory.mktemp("run") / "run"
    args = [
        "train",
        "tiny-synthetic",
        *overrides(data, out, "run.log_every=2", "run.tensorboard=true"),
        "--stage",
        "align",
        "--no-progress",
    ]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return out, result.stderr


def test_metrics_record_every_step_and_stderr_every_log_every_steps(run):
    out, stderr = run
    metrics = [json.loads(line) for line in (out / "align" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert re.findall(r"align step (\d+)/4", stderr) == ["2", "4"]


def test_tensorboard_gets_every_steps_metrics(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run
    metrics = [json.loads(line) for line in (out / "align" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard" / "align"))
    events.Reload()
    for key in ("loss", "text_loss", "lr", "grad_norm"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(m["step"], pytest.approx(m[key], rel=1e-6)) for m in metrics], key
    assert "rec_loss" not in events.Tags()["scalars"]  # no branch: its loss is absent, not zero


def test_tensorboard_without_the_package_is_refused_before_any_work(data, tmp_path, monkeypatch):
    for module in ("tensorboard", "tensorboardX"):  # as if not installed: the import system finds nothing
        monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "tiny-synthetic", *overrides(data, out, "run.tensorboard=true")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "the tensorboard package is not installed: pip install tensorboard" in result.stderr
    assert not out.exists()


def test_a_resumed_or_replaced_stage_leaves_one_curve(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    extra = ("run.tensorboard=true", "run.checkpoint_every=2")
    args = ["train", "tiny-synthetic", *overrides(data, out, *extra), "--stage", "align", "--no-progress"]
    assert CliRunner().invoke(app, args).exit_code == 0
    curves = out / "tensorboard" / "align"

    def logged_steps() -> list[int]:
        events = EventAccumulator(str(curves), purge_orphaned_data=False)  # what the files hold, as written
        events.Reload()
        return [e.step for e in events.Scalars("loss")]

    # Killed after step 4 before its output was written: --resume goes back to the step-2 checkpoint
    shutil.rmtree(out / "align" / "final")
    for checkpoint in (out / "align" / "checkpoints").iterdir():
        if checkpoint.name != "step-0000002":
            shutil.rmtree(checkpoint)
    assert CliRunner().invoke(app, [*args, "--resume"]).exit_code == 0
    purged = EventAccumulator(str(curves))  # as TensorBoard reads them: steps 3-4 of the first run dropped
    purged.Reload()
    assert [e.step for e in purged.Scalars("loss")] == [1, 2, 3, 4]
    assert logged_steps() == [1, 2, 3, 4, 3, 4]

    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert len(list(curves.glob("events.out.tfevents.*"))) == 1
    assert logged_steps() == [1, 2, 3, 4]
