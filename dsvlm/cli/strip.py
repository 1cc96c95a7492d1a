"""`dsvlm strip RUN_OR_CKPT --out DIR`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer

from dsvlm.cli.common import emit


def strip(
    source: Path = typer.Argument(..., help="A run directory or a stage output (RUN/<stage>/final)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the plain LLaVA checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier stripped model at --out."),
    force: bool = typer.Option(False, "--force", hidden=True, help="Deprecated spelling of --overwrite."),
    push_to_hub: str = typer.Option(None, "--push-to-hub", help="Also upload to this hub repo id."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout instead of the path."),
) -> None:
    """Drop the diffusion branch and write a verified transformers LLaVA directory (prints its path)."""
    from dsvlm.cli.common import console
    from dsvlm.strip.strip import push_to_hub as push
    from dsvlm.strip.strip import strip as run_strip

    if force:
        console.print("[yellow]warning:[/] --force is deprecated, use --overwrite")
    report = run_strip(source, out, overwrite=overwrite or force)
    console.print(
        f"[green]stripped[/] {report.params_removed:,} parameters removed "
        f"({report.params_before:,} -> {report.params_after:,}); "
        f"{report.bytes_before / 1e6:.1f} MB -> {report.bytes_after / 1e6:.1f} MB; "
        f"logits identical (max diff {report.max_logit_diff:.1e})"
    )
    if push_to_hub:
        console.print(f"pushed: {push(out, push_to_hub)}")
    emit(json.dumps(asdict(report)) if as_json else str(out))


def register(app: typer.Typer) -> None:
    app.command("strip")(strip)
