"""The model directory an evaluation runs on, checked before lmms-eval starts, and the device it runs on."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from dsvlm.errors import DsvlmError

log = logging.getLogger(__name__)


def resolve_model(path: str | Path) -> Path:
    """The model directory to evaluate, checked: a stripped dsvlm model (a transformers LLaVA folder with its
    processor). A training run is stripped first by the caller (`dsvlm.strip.strip.stripped_model`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DsvlmError(f"model {path} does not exist")
    problems = []
    config = path / "config.json"
    if not path.is_dir():
        problems.append("it is not a directory")
    elif not config.is_file():
        problems.append("no config.json")
    else:
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError):
            model_type = "unreadable"
        if model_type != "llava":
            problems.append(f"config.json has model_type {model_type!r}, not 'llava'")
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            problems.append("no *.safetensors weights")
        if not any((path / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
            problems.append("no processor (processor_config.json)")
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            problems.append("no tokenizer")
    if problems:
        raise DsvlmError(
            f"{path} is not a model directory ({'; '.join(problems)}); pass a stripped model, "
            "the output of `dsvlm strip RUN` (a transformers LLaVA folder with its processor)"
        )
    return path.resolve()


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """The device and dtype the model would be used with: "auto" is a GPU in bfloat16 (float16 where the GPU
    has no bfloat16) when one is present, else the CPU in float32."""
    if device == "auto" or dtype == "auto":
        import torch

        gpu = torch.cuda.is_available()
        if device == "auto":
            device = "cuda" if gpu else "cpu"
        if dtype == "auto":
            on_gpu = device.startswith("cuda") and gpu
            dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if on_gpu else "float32"
    return device, dtype


LARGE_ON_CPU = 1_000_000_000  # parameters; a 7B model takes hours per benchmark on a CPU


def warn_if_large_on_cpu(n_parameters: int, device: str) -> None:
    """Log a warning when a billion-parameter model is about to be evaluated on a CPU."""
    if device == "cpu" and n_parameters >= LARGE_ON_CPU:
        log.warning(
            "evaluating a %.1fB-parameter model on the CPU will be very slow; pass --device cuda on a GPU machine",
            n_parameters / 1e9,
        )


def count_parameters(model_path: Path) -> int:
    """Parameters in the model's safetensors files, read from their headers (no weights load); DsvlmError
    naming a file whose header does not cover it (cut short, not safetensors)."""
    from safetensors import SafetensorError, safe_open

    total = 0
    for file in model_path.glob("*.safetensors"):
        try:
            with safe_open(str(file), framework="np") as weights:
                for key in weights.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                    shape = weights.get_slice(key).get_shape()
                    total += int(math.prod(shape))
        except (SafetensorError, OSError) as exc:
            detail = str(exc)[:1].lower() + str(exc)[1:]  # one "error" in the message, the CLI's
            raise DsvlmError(
                f"{file}: the model's weights cannot be read ({detail}); the model directory is "
                "incomplete or corrupt: strip or download it again"
            ) from None
    return total
