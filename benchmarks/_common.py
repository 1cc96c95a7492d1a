"""Shared helpers of the benchmarks: environment defaults, machine facts, load average, RSS sampling, medians.

Import this module before torch: it sets `OMP_WAIT_POLICY=PASSIVE` (spinning OpenMP threads slow small ops
badly on a loaded machine), `HF_HUB_OFFLINE=1` and quiet library logs unless they are already set.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. the "requires torchvision" warning
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bar

import psutil
from rich.console import Console


def stderr_console() -> Console:
    """The tables' console: stderr, wide enough for the tables when stderr is not a terminal."""
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = 160
    return console


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    """The `model name` line of /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """The facts a result needs next to it: date, CPUs, libraries, thread settings."""
    import diffusers
    import torch
    import transformers

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def command_line() -> str:
    """How this benchmark was started, for the report."""
    return " ".join([Path(sys.executable).name, *sys.argv])


class RssPeak:
    """Samples this process's resident set size in a thread; `peak_mb` and `increase_mb` (over the RSS at
    entry) once the block ends. torch releases the GIL in its kernels, so the sampler keeps running."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start_mb = 0.0
        self.peak_mb = 0.0

    def _rss_mb(self) -> float:
        return self._process.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._rss_mb())
            time.sleep(self.interval_s)

    def __enter__(self) -> RssPeak:
        self.start_mb = self.peak_mb = self._rss_mb()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())

    @property
    def increase_mb(self) -> float:
        return self.peak_mb - self.start_mb


def round_robin(names: Sequence[str], round_index: int) -> list[str]:
    """ABBA order: forward on even rounds, reversed on odd ones, so slow drifts of the machine's load hit every
    configuration alike and none always runs first."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio_spread(values: Sequence[float], baseline: Sequence[float]) -> dict[str, float]:
    """Per-round ratios `values[i] / baseline[i]` (same round, so the same machine load): median, 25th and 75th
    percentile. The spread says how much to trust a ratio on a shared machine."""
    ratios = [v / b for v, b in zip(values, baseline, strict=True)]
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"median": round(median(ratios), 3), "p25": round(low, 3), "p75": round(high, 3)}


def run_quiet(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Run a command, return its stdout; on failure raise with its stderr tail."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def dsvlm(*args: str) -> str:
    """Run the `dsvlm` command line of this interpreter's environment; its stdout."""
    return run_quiet([sys.executable, "-m", "dsvlm", *args])


def prepare_synthetic(out: Path, n_align: int, n_instruct: int, n_eval: int) -> Path:
    """`dsvlm prepare synthetic OUT --n-align .. --n-instruct .. --n-eval ..`; returns OUT."""
    dsvlm(
        "prepare",
        "synthetic",
        str(out),
        "--n-align",
        str(n_align),
        "--n-instruct",
        str(n_instruct),
        "--n-eval",
        str(n_eval),
    )
    return out


def write_report(path: Path | None, report: dict[str, Any]) -> None:
    """Write the report to `path` (if given) as indented JSON."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
