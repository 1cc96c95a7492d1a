"""`dsvlm probe MODEL_OR_RUN`: linear probes of the frozen visual features (no LLM involved)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dsvlm.cli.common import emit


def probe(
    model: Path = typer.Argument(
        ..., help="Stripped model directory, or a training run / stage output (stripped on the fly)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: MODEL/probe)."),
    n_train: int = typer.Option(1024, "--n-train", min=1, help="Probe training images per scene set."),
    n_test: int = typer.Option(512, "--n-test", min=1, help="Held-out probe images per scene set."),
    steps: int = typer.Option(100, "--steps", min=1, help="L-BFGS iterations of each probe (full batch)."),
    l2: float = typer.Option(1e-3, "--l2", min=0.0, help="L2 penalty on the probe weights."),
    per_patch: bool = typer.Option(
        True, "--per-patch/--no-per-patch", help="Also probe flattened per-patch features where they are small enough."
    ),
    device: str | None = typer.Option(None, "--device", help="Torch device (default: cuda if available, else cpu)."),
    as_json: bool = typer.Option(False, "--json", help="Print probe.json on stdout instead of its path."),
) -> None:
    """Probe colour, shape, position, size and count from every encoder layer and the connector; write
    probe.json, probe.md and probe.png (layer x attribute accuracy). Prints the probe.json path."""
    from dsvlm.analysis.probe import PROBE_JSON, ProbeConfig, probe_model, table
    from dsvlm.cli.common import console

    config = ProbeConfig(n_train=n_train, n_test=n_test, steps=steps, l2=l2, per_patch=per_patch)
    out_dir = out if out is not None else model / "probe"
    result = probe_model(model, out_dir, config, device=device)
    console.print(table(result), markup=False)
    emit(json.dumps(result, indent=2) if as_json else str(Path(out_dir).resolve() / PROBE_JSON))


def register(app: typer.Typer) -> None:
    app.command("probe")(probe)
