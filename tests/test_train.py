"""`dsvlm train` on the tiny recipe: learning, resume after SIGKILL, DDP equivalence, freezing, bad input."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import REPO, cli, launch, prepare_small_synthetic, tiny_model, tiny_overrides
from safetensors.torch import load_file

from dsvlm.errors import DsvlmError
from dsvlm.outputs import lock_path
from dsvlm.recipe import load_recipe
from dsvlm.train.loop import TrainOptions, train

TIMING_KEYS = {"step_time_s", "elapsed_s", "samples_per_s", "tokens_per_s", "tokens_per_s_per_device", "mfu"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_small_synthetic(tmp_path_factory.mktemp("data") / "synthetic", n=96)


def weights(final: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(final.rglob("*.safetensors")):
        for key, value in load_file(file).items():
            tensors[f"{file.relative_to(final)}:{key}"] = value
    return tensors


def metrics(run: Path, stage: str) -> list[dict]:
    lines = (run / stage / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0 if atol == 0 else 1e-4, msg=key)


@pytest.mark.slow  # 2 x 30 steps: enough for the losses to fall
def test_two_stages_lower_both_losses_and_write_outputs(data, tmp_path):
    out = tmp_path / "run"
    recipe = load_recipe(
        "tiny-synthetic", tiny_overrides(data, out, steps=30, batch=16, **{"run.checkpoint_every": 100})
    )
    final = train(recipe, TrainOptions(progress=False))
    assert final == out / "instruct" / "final"
    for stage in ("align", "instruct"):
        lines = metrics(out, stage)
        assert [m["step"] for m in lines] == list(range(1, 31))
        assert mean(lines[-5:], "text_loss") < mean(lines[:5], "text_loss"), stage
        assert (out / stage / "loss.png").stat().st_size > 1000
        assert (out / stage / "reconstructions.png").stat().st_size > 100
        info = json.loads((out / stage / "final" / "stage.json").read_text())
        assert info["steps"] == 30 and info["supervision"] is True
    assert json.loads((out / "instruct" / "final" / "stage.json").read_text())["init"].endswith("align/final")
    # The branch learns over the run (the frozen UNet's adapters; within one 30-step stage the noise hides it).
    assert mean(metrics(out, "instruct")[-5:], "rec_loss") < mean(metrics(out, "align")[:5], "rec_loss")
    assert (out / "recipe.yaml").is_file() and json.loads((out / "env.json").read_text())["world_size"] == 1


def mean(lines: list[dict], key: str) -> float:
    return sum(m[key] for m in lines) / len(lines)


def test_frozen_modules_stay_bit_identical(data, tmp_path):
    """Stage `align` trains only connector + supervision: vision tower and LLM must not move at all."""
    out = tmp_path / "run"
    overrides = tiny_overrides(data, out, steps=3, **{"stages.0.train": "[connector,supervision]"})
    recipe = load_recipe("tiny-synthetic", overrides)
    train(recipe, TrainOptions(stages=["align"], progress=False))
    fresh = tiny_model(recipe).vlm.state_dict()  # same seed: the weights the stage started from
    trained = tiny_model(recipe, init=out / "align" / "final").vlm.state_dict()
    moved = {k for k, v in trained.items() if not torch.equal(v, fresh[k])}
    assert moved, "nothing trained"
    assert all(".multi_modal_projector." in k for k in moved), sorted(moved)[:5]


def _train_args(data: Path, out: Path, *extra: str, steps: int = 6) -> list[str]:
    return [
        "train",
        "tiny-synthetic",
        *tiny_overrides(data, out, steps=steps),
        "--stage",
        "align",
        "--no-progress",
        *extra,
    ]


def _run_cli_train(data: Path, out: Path, *extra: str, steps: int = 6, check: bool = True):
    """`dsvlm train ... --stage align` in process."""
    return cli(*_train_args(data, out, *extra, steps=steps), check=check)


@pytest.mark.slow  # a real process killed mid-run, then two more runs
def test_kill_and_resume_matches_an_uninterrupted_run(data, tmp_path):
    reference = tmp_path / "reference"
    _run_cli_train(data, reference)

    interrupted = tmp_path / "interrupted"
    args = [sys.executable, "-m", "dsvlm", *_train_args(data, interrupted)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    checkpoint = interrupted / "align" / "checkpoints" / "step-0000004" / "trainer_state.json"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "the run never reached its second checkpoint"
    assert not (interrupted / "align" / "final" / "stage.json").exists(), "killed too late to test resume"

    refused = _run_cli_train(data, interrupted, check=False)
    assert refused.exit_code == 2 and "--resume" in refused.stderr

    # A corrupt newest checkpoint is skipped with a warning; the previous one is used.
    (checkpoint.parent / "model.safetensors").write_bytes(b"garbage")
    resumed = _run_cli_train(data, interrupted, "--resume")
    assert "skipping checkpoint" in resumed.stderr
    assert resumed.stdout.strip() == str(interrupted / "align" / "final")
    assert_same_weights(reference / "align" / "final", interrupted / "align" / "final", atol=1e-6)
    ref_metrics, res_metrics = metrics(reference, "align"), metrics(interrupted, "align")
    assert [m["step"] for m in res_metrics] == list(range(1, 7))
    for a, b in zip(ref_metrics, res_metrics, strict=True):
        for key in ("text_loss", "rec_loss", "loss", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_a_resume_inside_the_second_epoch_trains_on_the_same_batches(tmp_path):
    # 16 records in batches of 4: 4 steps per epoch. A run of 7 steps with a checkpoint every step; the stage
    # output and the checkpoints after step 5 removed (a crash in epoch 1, whose order differs from epoch 0's):
    # --resume redoes steps 6 and 7 on epoch 1's batches, as the uninterrupted run did.
    data = prepare_small_synthetic(tmp_path / "data", n=16)
    out = tmp_path / "run"
    args = ["train", "tiny-synthetic", *tiny_overrides(data, out, steps=7, batch=4), "run.checkpoint_every=1"]
    cli(*args, "--stage", "align", "--no-progress", check=True)
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(out / "align" / "final", uninterrupted)
    reference = metrics(out, "align")
    shutil.rmtree(out / "align" / "final")
    for checkpoint in (out / "align" / "checkpoints").iterdir():
        if checkpoint.name > "step-0000005":
            shutil.rmtree(checkpoint)
    resumed = cli(*args, "--stage", "align", "--no-progress", "--resume", check=True)
    assert "(step 5)" in " ".join(resumed.stderr.split())  # "resumed from ... (step 5)", however rich wraps it
    assert_same_weights(uninterrupted, out / "align" / "final", atol=1e-6)
    again = metrics(out, "align")
    assert [m["step"] for m in again] == list(range(1, 8))
    for a, b in zip(reference[5:], again[5:], strict=True):  # steps 6 and 7: the same records, the same losses
        assert (a["tokens"], a["text_loss"]) == (b["tokens"], pytest.approx(b["text_loss"], rel=1e-5)), a["step"]


@pytest.mark.slow  # torch.distributed.run launches two training processes
def test_two_processes_match_one_process_at_the_same_global_batch(data, tmp_path):
    # Every image reconstructed: a per-device sub-batch limit would differ between the two layouts.
    single = tmp_path / "single"
    _run_cli_train(data, single, "supervision.reconstruct_per_batch=null", steps=3)
    ddp = tmp_path / "ddp"
    launch(
        ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"],
        "train",
        "tiny-synthetic",
        *tiny_overrides(data, ddp, steps=3),
        "stages.0.per_device_batch_size=4",
        "supervision.reconstruct_per_batch=null",
        "--stage",
        "align",
        "--no-progress",
    )
    info = json.loads((ddp / "align" / "final" / "stage.json").read_text())
    assert info["world_size"] == 2
    assert len(set(info["rank_checksums"])) == 1, "ranks diverged"
    assert json.loads((ddp / "env.json").read_text())["world_size"] == 2
    assert_same_weights(single / "align" / "final", ddp / "align" / "final", atol=2e-5)
    for a, b in zip(metrics(single, "align"), metrics(ddp, "align"), strict=True):
        assert a["text_loss"] == pytest.approx(b["text_loss"], rel=1e-4)
        assert a["rec_loss"] == pytest.approx(b["rec_loss"], rel=1e-4)


@pytest.mark.slow  # torch.distributed.run launches two processes
@pytest.mark.parametrize("case", ["not a run", "locked"])
def test_every_process_stops_with_the_main_ones_refusal_of_the_output_dir(data, tmp_path, case):
    # Only the main process takes, checks and makes the run directory (another checking meanwhile would see a
    # half-made run and refuse it); its refusal reaches every rank, which all stop with the same user error.
    out = tmp_path / "run"
    if case == "not a run":
        out.mkdir()
        (out / "notes.txt").write_text("a user's file")
        message = f"{out} is not empty and is not a dsvlm run"
    else:
        lock_path(out).write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live process holds the run
        message = f"{out} is being written by another dsvlm process (pid {os.getpid()}"
    port = {"not a run": "29532", "locked": "29533"}[case]
    launcher = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, "--tee", "2"]
    overrides = [*tiny_overrides(data, out), "stages.0.per_device_batch_size=4", "stages.1.per_device_batch_size=4"]
    result = launch(launcher, "train", "tiny-synthetic", *overrides, "--no-progress", check=False)
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"[default{rank}]:error: {message}" in result.stderr, (rank, result.stderr[-3000:])
    assert "Connection closed" not in result.stderr and "[rank" not in result.stderr  # no rank crashed
    if case == "not a run":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()


def test_an_init_inside_a_stage_that_overwrite_deletes_is_refused(tiny_run, tmp_path):
    run = tiny_run.copy(tmp_path / "run")
    result = cli("train", "tiny-synthetic", *run.overrides(), "--stage", "align", "--init", run.final, "--overwrite")
    assert result.exit_code == 2 and "which --overwrite would delete first" in result.stderr
    assert (run.final / "stage.json").is_file()


def test_missing_data_fails_before_building_anything(tmp_path):
    result = cli(
        "train", "tiny-synthetic", f"data.dataset={tmp_path / 'nowhere'}", f"run.output_dir={tmp_path / 'run'}"
    )
    assert result.exit_code == 2
    assert "nowhere" in result.stderr and "dsvlm prepare" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_another_runs_directory_is_refused_and_kept(tiny_run, tmp_path):
    run = tiny_run.copy(tmp_path / "run")
    before = weights(run.final)
    stage_json = (run.final / "stage.json").read_text()
    other = cli("train", "tiny-synthetic", *run.overrides(), "supervision.weight=0.5", "--stage", "align")
    assert other.exit_code == 2 and "different recipe" in other.stderr
    again = cli("train", "tiny-synthetic", *run.overrides(), "--stage", "align")
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    after = weights(run.final)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert (run.final / "stage.json").read_text() == stage_json
    replaced = cli("train", "tiny-synthetic", *run.overrides(), "--stage", "align", "--overwrite", check=True)
    assert replaced.stdout.strip() == str(run.final)
    assert (run.final / "stage.json").read_text() != stage_json  # trained anew: another finish time


@pytest.mark.parametrize("where", ["folder", "cwd", "home"])
def test_overwrite_never_deletes_a_folder_that_is_not_a_run(data, tmp_path, monkeypatch, where):
    """`--overwrite` deletes the recipe's stages: only inside a directory dsvlm marked as a run."""
    mine = tmp_path / "mine"
    (mine / "align").mkdir(parents=True)
    (mine / "align" / "notes.txt").write_text("precious")
    monkeypatch.chdir(mine if where == "cwd" else tmp_path)
    monkeypatch.setenv("HOME", str(mine if where == "home" else tmp_path / "home"))
    out = Path(".") if where == "cwd" else mine
    if where != "folder":
        (mine / ".dsvlm-run").write_text("")  # even a run there is never replaced
    result = cli("train", "tiny-synthetic", *tiny_overrides(data, out), "--overwrite")
    assert result.exit_code == 2 and "refusing to replace" in result.stderr
    assert "Traceback" not in result.output
    assert (mine / "align" / "notes.txt").read_text() == "precious"


def test_a_second_writer_of_the_run_stops_at_once(data, tmp_path):
    out = tmp_path / "run"
    lock_path(out).write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live process holds the run
    result = cli("train", "tiny-synthetic", *tiny_overrides(data, out))
    assert result.exit_code == 2 and f"being written by another dsvlm process (pid {os.getppid()}" in result.stderr
    assert not out.exists()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path):
    """An absurd learning rate blows the weights up at step 3: no NaN model may come out of it."""
    out = tmp_path / "run"
    args = [
        "train",
        "tiny-synthetic",
        *tiny_overrides(data, out, steps=6),
        "stages.0.lr=1e30",
        "stages.0.warmup_ratio=0.5",
        "stages.0.max_grad_norm=null",
        "--stage",
        "align",
        "--no-progress",
    ]
    result = cli(*args)
    assert result.exit_code == 1 and "Traceback" not in result.output  # a failure, not a user error
    # rich folds long paths at the console's width: look for the checkpoint's name with whitespace removed
    assert "the loss at step 3 is nan" in result.stderr and "step-0000002" in "".join(result.stderr.split())
    assert [p.name for p in (out / "align" / "checkpoints").iterdir()] == ["step-0000002"]
    assert not (out / "align" / "final").exists()


def test_unwritable_output_path(data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = _run_cli_train(data, blocker / "run", check=False)
    assert result.exit_code == 2 and "cannot write to the output directory" in result.stderr
    assert "Traceback" not in result.output


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past `limit` bytes fail with EFBIG, as on a full disk (this process's soft limit, restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_disk_full_during_checkpoint_is_a_clear_error(data, tmp_path):
    """A file-size limit makes writes fail mid-checkpoint, as a full disk would."""
    out = tmp_path / "run"
    with file_size_limit(2_500_000):
        result = _run_cli_train(data, out, check=False)
    assert result.exit_code == 1, result.stderr[-2000:]  # a failure of the machine, not of the input
    assert "could not write" in result.stderr and "Traceback" not in result.output
    leftovers = [p.name for p in (out / "align" / "checkpoints").iterdir()] if (out / "align").exists() else []
    assert not [n for n in leftovers if n.endswith(".tmp")]


def test_latent_cache_of_another_vae_is_refused(tmp_path):
    """A recipe with a (tiny, inline) VAE refuses a cache built for other VAE weights or another resolution."""
    data = prepare_small_synthetic(tmp_path / "data", n=16)
    vae = (
        "supervision.diffusion.vae_config={in_channels: 3, out_channels: 3, latent_channels: 4, "
        "block_out_channels: [8, 16], down_block_types: [DownEncoderBlock2D, DownEncoderBlock2D], "
        "up_block_types: [UpDecoderBlock2D, UpDecoderBlock2D], norm_num_groups: 8, sample_size: 32}"
    )
    latent_unet = "supervision.diffusion.unet_config.in_channels=4"
    common = [
        vae,
        "supervision.diffusion.pixel_space=false",
        latent_unet,
        "supervision.diffusion.unet_config.out_channels=4",
        "supervision.diffusion.unet_config.sample_size=16",
    ]
    cli(
        "prepare",
        "synthetic",
        data,
        "--n-align",
        "16",
        "--n-instruct",
        "16",
        "--n-eval",
        "4",
        "--overwrite",
        "--latents",
        "tiny-synthetic",
        *common,
        "run.seed=123",
        check=True,
    )
    result = cli(
        "train", "tiny-synthetic", *tiny_overrides(data, tmp_path / "run", steps=1), *common, "--stage", "align"
    )
    assert result.exit_code == 2
    assert "latent" in result.stderr.lower() and "Traceback" not in result.output
    assert not (tmp_path / "run" / "align" / "final").exists()


def test_stage_two_alone_starts_from_init(tiny_run, tmp_path):
    second = tmp_path / "second"
    result = cli(
        "train",
        "tiny-synthetic",
        *tiny_overrides(tiny_run.data, second, steps=2),
        "--stage",
        "instruct",
        "--init",
        tiny_run.root,
        "--no-progress",
        check=True,
    )
    final = Path(result.stdout.strip())
    assert final == second / "instruct" / "final"
    assert json.loads((final / "stage.json").read_text())["init"] == str(tiny_run.final)
    assert not (second / "align").exists()  # the first stage came from --init, not trained again


def test_unknown_stage_is_an_error(data, tmp_path):
    with pytest.raises(DsvlmError, match="not in the recipe"):
        train(load_recipe("tiny-synthetic", tiny_overrides(data, tmp_path)), TrainOptions(stages=["pretrain"]))


def test_a_bf16_stage_holds_the_frozen_unet_in_bf16_and_still_writes_its_preview(data, tmp_path, caplog):
    out = tmp_path / "run"
    recipe = load_recipe(
        "tiny-synthetic", tiny_overrides(data, out, steps=2, batch=4, **{"stages.0.precision": "bf16"})
    )
    with caplog.at_level("INFO", logger="dsvlm.train.loop"):
        train(recipe, TrainOptions(stages=["align"], progress=False))
    assert "frozen UNet/VAE weights held in 16 bits" in caplog.text
    # the preview samples with the bf16 UNet outside the training forward: under the stage's autocast too
    assert (out / "align" / "reconstructions.png").is_file()
    assert [record["step"] for record in metrics(out, "align")] == [1, 2]
