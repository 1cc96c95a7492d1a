"""`dsvlm eval MODEL --bench NAME[,NAME...]`: score a stripped model through lmms-eval."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dsvlm.cli.common import console, emit
from dsvlm.evaluation.benches import BENCHMARKS, parse_benches, parse_data_files


def register(app: typer.Typer) -> None:
    """Add the `eval` command to the root app."""
    app.command("eval")(eval_command)


def eval_command(
    model: Path = typer.Argument(
        ..., help="Stripped model directory (the output of `dsvlm strip`), or a training run (stripped on the fly)."
    ),
    bench: list[str] = typer.Option(
        ..., "--bench", "-b", help=f"Benchmarks, comma-separated or repeated: {', '.join(BENCHMARKS)}."
    ),
    data_files: list[str] = typer.Option(
        [],
        "--data-files",
        help="BENCH=PATH (repeatable): a local parquet copy of a benchmark, or a prepared dataset folder "
        "(`synthetic` needs one).",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Output folder (default: results/<model>/<benchmarks>, outside the model directory)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Generation batch size."),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Only the first N items of each benchmark."
    ),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", min=1, help="Cap every task's generation length (default: each task's own)."
    ),
    device: str = typer.Option("auto", "--device", help="Torch device: auto (a GPU when present), cpu, cuda..."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary JSON instead of its path."),
    compare_to: Path | None = typer.Option(
        None, "--compare", help="Another summary.json (or its folder): print per-benchmark and per-category deltas."
    ),
) -> None:
    """Run benchmarks through lmms-eval; print the summary path (or, with --json, the summary)."""
    from dsvlm.evaluation.runner import SUMMARY, compare, compare_table, default_out_dir, evaluate, load_summary
    from dsvlm.strip.strip import stripped_model

    names = parse_benches(bench)
    files = parse_data_files(data_files)
    base = load_summary(compare_to) if compare_to is not None else None  # a bad file fails before the run
    out_dir = out if out is not None else default_out_dir(model, names)
    summary = evaluate(
        stripped_model(model),
        names,
        out_dir,
        data_files=files,
        batch_size=batch_size,
        limit=limit,
        max_new_tokens=max_new_tokens,
        device=device,
        dtype=dtype,
    )
    if base is not None:
        deltas = compare(base, summary)
        console.print(compare_table(deltas))
        summary = {**summary, "compare": deltas}
    if as_json:
        emit(json.dumps(summary, indent=2))
    else:
        emit(str(Path(out_dir).expanduser().resolve() / SUMMARY))
