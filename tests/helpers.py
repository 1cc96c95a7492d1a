"""Shared test helpers: a small synthetic dataset and tiny-recipe overrides that train in seconds."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from click.testing import Result

REPO = Path(__file__).resolve().parents[1]


def cli(*args: object, check: bool = False, env: dict | None = None) -> Result:
    """Run the CLI in process (typer's CliRunner): exit code, stdout and stderr apart, as users see them, without
    the seconds a fresh interpreter spends importing torch. Tests about the process itself (a kill, a launch of
    several processes, the console entry point) run `python -m dsvlm` instead."""
    from typer.testing import CliRunner

    from dsvlm.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if check and result.exit_code != 0:
        raise AssertionError(
            f"dsvlm {' '.join(map(str, args))} failed ({result.exit_code}):\n{result.stderr[-3000:]}"
        ) from result.exception
    return result


def launch(launcher: list[str], *args: object, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m LAUNCHER... -m dsvlm ARGS` (torch.distributed.run or accelerate launch), one thread per process.
    On a failure (`check`) the message shows what the ranks printed, not the launcher's report after it."""
    cmd = [sys.executable, "-m", *launcher, "-m", "dsvlm", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    if check and result.returncode != 0:
        ranks = result.stderr.split("\nTraceback (most recent call last):")[0]  # the launcher's own, unprefixed
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{ranks[-4000:]}")
    return result


def scratch_dir(prefix: str) -> Path:
    """A folder for what a test process builds once and shares, removed when the process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


_SYNTHETIC: dict[int, Path] = {}


def prepare_small_synthetic(out: Path, n: int = 64) -> Path:
    """`dsvlm prepare synthetic OUT --n-align N --n-instruct N --n-eval 16 --seed 1`, generated once per test
    process and copied (tests may add latents or edit it)."""
    if n not in _SYNTHETIC:
        from dsvlm.data.synthetic import SyntheticConfig, prepare_synthetic

        cached = scratch_dir("dsvlm-test-synthetic-") / "synthetic"
        prepare_synthetic(cached, SyntheticConfig(n_align=n, n_instruct=n, n_eval=16, seed=1), progress=False)
        _SYNTHETIC[n] = cached
    shutil.copytree(_SYNTHETIC[n], out)
    return out


_TINY_DIFFUSION: dict[str, Path] = {}


def tiny_diffusion(prediction_type: str = "sample") -> Path:
    """A barely pretrained diffusion model in tiny-synthetic's layout, built once per test process through the
    real `pretrain_diffusion` (two steps: the tests need its format, not its quality)."""
    if prediction_type not in _TINY_DIFFUSION:
        from dsvlm.data.synthetic import SyntheticConfig, prepare_synthetic
        from dsvlm.diffusion.pretrain import PretrainOptions, pretrain_diffusion

        root = scratch_dir("dsvlm-test-diffusion-")
        data = root / "data"
        prepare_synthetic(data, SyntheticConfig(n_align=8, n_instruct=4, n_eval=2), progress=False)
        options = PretrainOptions(
            steps=2, batch_size=4, eval_captions=2, sample_steps=2, prediction_type=prediction_type
        )
        _TINY_DIFFUSION[prediction_type] = pretrain_diffusion(data, root / "diffusion", options, progress=False)
    return _TINY_DIFFUSION[prediction_type]


def tiny_sizes(steps: int = 4, batch: int = 8) -> list[str]:
    """Overrides that shrink the tiny-synthetic recipe (or a documented command on it) to a few steps of a small
    batch, with short previews and sampling."""
    values: dict[str, object] = {
        "run.checkpoint_every": 2,
        "run.log_every": 1,
        "run.preview_images": 2,
        "supervision.sampler_steps": 2,
        "supervision.reconstruct_per_batch": 4,
    }
    for i in (0, 1):
        values.update(
            {
                f"stages.{i}.max_steps": steps,
                f"stages.{i}.global_batch_size": batch,
                f"stages.{i}.per_device_batch_size": batch,
            }
        )
    return [f"{k}={v}" for k, v in values.items()]


def tiny_overrides(data: Path, out: Path, steps: int = 4, batch: int = 8, **extra: object) -> list[str]:
    """The tiny-synthetic recipe shrunk by `tiny_sizes`, on `data` and the tiny pretrained diffusion model."""
    paths = {"data.dataset": data, "run.output_dir": out, "supervision.diffusion.pretrained": tiny_diffusion()}
    return [f"{k}={v}" for k, v in paths.items()] + tiny_sizes(steps, batch) + [f"{k}={v}" for k, v in extra.items()]


def tiny_vlm(cfg, seed: int = 0):
    """`build_vlm` with the synthetic set's words for an inline LLM's tokenizer, as `dsvlm train` passes them."""
    from dsvlm.data.synthetic import synthetic_vocabulary
    from dsvlm.model.vlm import build_vlm

    return build_vlm(cfg, seed=seed, words=synthetic_vocabulary())


def tiny_model(recipe, init: Path | None = None, **options):
    """`build_model` with the synthetic set's words, as `dsvlm train` passes them."""
    from dsvlm.data.synthetic import synthetic_vocabulary
    from dsvlm.model.dsvlm import build_model

    return build_model(recipe, init=init, words=synthetic_vocabulary(), **options)
