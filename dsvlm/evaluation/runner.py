"""Run benchmarks through lmms-eval and summarise them: `evaluate`, `compare`.

Outputs under `out_dir`: `results.json` (lmms-eval's results), `samples_<bench>.jsonl` (lmms-eval's
per-sample records), `summary.json` (per benchmark: task, metric, score, n, samples file, and for the
MMBench-schema benchmarks per-category scores) and whatever the tasks' own aggregations write (e.g.
`submissions/`), which lmms-eval puts under its output path.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import tempfile
import time
import warnings
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.table import Table

from dsvlm.console import console
from dsvlm.errors import DsvlmError, RunFailure
from dsvlm.evaluation.benches import (
    Benchmark,
    ensure_available,
    ensure_judge,
    ensure_requirements,
    get_benchmark,
    resolve_data_file,
    write_task_yaml,
)
from dsvlm.evaluation.compat import apply_workarounds, check_filelock, lmms_cli_args, route_lmms_eval_logs
from dsvlm.evaluation.model_dir import count_parameters, resolve_device, resolve_model, warn_if_large_on_cpu
from dsvlm.io import atomic_write_json, atomic_write_text
from dsvlm.rundir import FINAL, STRIPPED

log = logging.getLogger(__name__)

SUMMARY = "summary.json"


def evaluate(
    model_dir: str | Path,
    benches: list[str],
    out_dir: str | Path,
    data_files: dict[str, str] | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    model: str = "dsvlm",
    model_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score `model_dir` on `benches` with lmms-eval; write results, samples and `summary.json`.

    `max_new_tokens` caps every task's generation length (None: each task's own setting). `model` names the
    lmms-eval model class ("dsvlm", or e.g. "llava_hf" for a reference run, with `model_args` extra
    arguments); `batch_size`, `device` and `dtype` apply to the dsvlm class ("auto": see
    `resolve_device`). Returns the summary.
    """
    check_filelock()
    model_path = resolve_model(model_dir)
    plan = _plan(benches, data_files or {})
    device, dtype = resolve_device(device, dtype)
    n_parameters = count_parameters(model_path)  # reads every weights file's header: one cut short fails here
    if model == "dsvlm":
        warn_if_large_on_cpu(n_parameters, device)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="dsvlm-tasks-") as include_dir:
        tasks = {b.name: write_task_yaml(b, Path(include_dir), f, max_new_tokens) for b, f in plan}
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.tasks import TaskManager

        route_lmms_eval_logs()
        apply_workarounds()
        lm = load_model(model, model_path, batch_size, device, dtype, model_args)
        task_manager = TaskManager("WARNING", include_path=include_dir, include_defaults=False, model_name=model)
        start = time.perf_counter()
        # Task aggregations print() their reports; stdout belongs to the caller's pipeline.
        with contextlib.redirect_stdout(sys.stderr):
            results = simple_evaluate(
                model=lm,
                tasks=list(tasks.values()),
                task_manager=task_manager,
                limit=limit,
                bootstrap_iters=0,
                log_samples=True,
                verbosity="WARNING",
                cli_args=lmms_cli_args(out),
            )
        seconds = time.perf_counter() - start
    run_facts = {"device": device, "dtype": dtype} if model == "dsvlm" else {}
    summary = _write_outputs(
        results,
        plan,
        tasks,
        out,
        model_path,
        model,
        seconds,
        limit,
        getattr(lm, "batch_size", None),
        {**run_facts, "max_new_tokens": max_new_tokens},
    )
    console.print(summary_table(summary))
    return summary


def default_out_dir(model_dir: str | Path, benches: list[str], root: str | Path = "results") -> Path:
    """Where `dsvlm eval` writes without --out: ROOT/<model>/<bench+bench>, outside the model directory.

    A stripped run (RUN/<stage>/stripped) is named RUN-<stage>, so runs evaluated side by side stay apart.
    """
    path = Path(model_dir).expanduser().resolve()
    name = f"{path.parent.parent.name}-{path.parent.name}" if path.name in (STRIPPED, FINAL) else path.name
    return Path(root) / name / "+".join(benches)


def compare(base: dict[str, Any] | str | Path, new: dict[str, Any] | str | Path) -> dict[str, dict[str, Any]]:
    """Per benchmark: `base` score, `new` score and `delta` = new - base (None where one side lacks it), and
    where either side has per-category scores, the same per category under `categories`."""
    a, b = load_summary(base), load_summary(new)
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys([*a["benchmarks"], *b["benchmarks"]]):
        row_a, row_b = a["benchmarks"].get(name, {}), b["benchmarks"].get(name, {})
        out[name] = _delta(row_a.get("score"), row_b.get("score"))
        cats_a, cats_b = row_a.get("categories") or {}, row_b.get("categories") or {}
        if cats_a or cats_b:
            out[name]["categories"] = {
                cat: _delta(cats_a.get(cat, {}).get("score"), cats_b.get(cat, {}).get("score"))
                for cat in sorted({*cats_a, *cats_b})
            }
    return out


def _delta(base: float | None, new: float | None) -> dict[str, float | None]:
    return {"base": base, "new": new, "delta": None if base is None or new is None else new - base}


def summary_table(summary: dict[str, Any]) -> Table:
    """The summary as a rich table."""
    table = Table("benchmark", "task", "metric", "score", "n", title=f"dsvlm eval: {summary['model']}")
    for name, row in summary["benchmarks"].items():
        score = "-" if row["score"] is None else f"{row['score']:.4g}"
        table.add_row(name, row["task"], row["metric"], score, str(row["n"]))
        for category, part in row.get("categories", {}).items():
            table.add_row(f"  {category}", "", "category", f"{part['score']:.4g}", str(part["n"]), style="dim")
    return table


def compare_table(deltas: dict[str, dict[str, Any]]) -> Table:
    """`compare`'s output as a rich table."""
    table = Table("benchmark", "base", "new", "delta", title="comparison")

    def fmt(value: float | None, signed: bool = False) -> str:
        return "-" if value is None else (f"{value:+.4g}" if signed else f"{value:.4g}")

    for name, row in deltas.items():
        table.add_row(name, fmt(row["base"]), fmt(row["new"]), fmt(row["delta"], signed=True))
        for category, part in row.get("categories", {}).items():
            table.add_row(
                f"  {category}", fmt(part["base"]), fmt(part["new"]), fmt(part["delta"], signed=True), style="dim"
            )
    return table


def _plan(benches: list[str], data_files: dict[str, str]) -> list[tuple[Benchmark, Path | None]]:
    """Validate names and data before anything heavy loads."""
    if not benches:
        raise DsvlmError("no benchmark given")
    for name in data_files:
        if name not in benches:
            raise DsvlmError(
                f"--data-files names {name!r}, which is not among the benchmarks run ({', '.join(benches)})"
            )
    plan = []
    for name in dict.fromkeys(benches):
        bench = get_benchmark(name)
        data_file = resolve_data_file(bench, data_files[name]) if name in data_files else None
        ensure_available(bench, data_file)
        ensure_requirements(bench)
        ensure_judge(bench)
        plan.append((bench, data_file))
    return plan


def load_model(
    model: str,
    path: Path,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    extra: dict[str, Any] | None = None,
) -> Any:
    """An lmms-eval model instance: dsvlm's class directly, any other through lmms-eval's registry.

    `batch_size`, `device` and `dtype` apply to the dsvlm class; another class gets `pretrained` and `extra`
    (its own model args) only.
    """
    extra = extra or {}
    if model == "dsvlm":
        from dsvlm.evaluation.lmms_model import DsvlmLlava

        return DsvlmLlava(pretrained=str(path), batch_size=batch_size, device=device, dtype=dtype, **extra)
    from lmms_eval.models import get_model

    args = ",".join(f"{k}={v}" for k, v in {"pretrained": path, **extra}.items())
    return get_model(model).create_from_arg_string(args)


def _write_outputs(
    results: dict[str, Any] | None,
    plan: list[tuple[Benchmark, Path | None]],
    tasks: dict[str, str],
    out: Path,
    model_path: Path,
    model: str,
    seconds: float,
    limit: int | None,
    batch_size: int | None,
    run_facts: dict[str, Any],
) -> dict[str, Any]:
    from lmms_eval.utils import handle_non_serializable

    if not results:
        raise RunFailure("lmms-eval returned no results")
    samples = results.pop("samples", {})
    results_file = out / "results.json"
    atomic_write_text(results_file, json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    benchmarks = {}
    for bench, data_file in plan:
        task = tasks[bench.name]
        samples_file = out / f"samples_{bench.name}.jsonl"
        with samples_file.open("w", encoding="utf-8") as fh:
            for sample in samples.get(task, []):
                fh.write(json.dumps(sample, default=handle_non_serializable, ensure_ascii=False) + "\n")
        metric, score = _headline(results["results"].get(task, {}), bench.metric)
        benchmarks[bench.name] = {
            "task": task,
            "lmms_eval_task": bench.task,
            "metric": metric,
            "score": score,
            "n": results.get("n-samples", {}).get(task, {}).get("effective", len(samples.get(task, []))),
            "samples": str(samples_file),
            "data": str(data_file) if data_file else bench.task_config()["dataset_path"],
        }
        categories = category_scores(samples.get(task, []))
        if categories is not None:
            benchmarks[bench.name]["categories"] = categories
    summary = {
        "model": str(model_path),
        "model_class": model,
        "lmms_eval_version": metadata.version("lmms_eval"),
        "batch_size": batch_size,
        **run_facts,
        "limit": limit,
        "seconds": round(seconds, 3),
        "results": str(results_file),
        "benchmarks": benchmarks,
    }
    atomic_write_json(out / SUMMARY, summary)
    return summary


def category_scores(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]] | None:
    """Per `category` of an MMBench-schema benchmark (synthetic, mmbench): score and item count, scored by
    lmms-eval's static MMBench scorer like the headline (so in percent, and the n-weighted mean of the
    categories is the headline). None for a benchmark whose samples carry no MMBench record."""
    records = [sample.get("gpt_eval_score") for sample in samples]
    if not records or not all(isinstance(r, dict) and "category" in r for r in records):
        return None
    from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator

    # The scorer prints a report (stdout belongs to the caller) and trips pandas' chained-assignment warning.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, accuracy, _ = MMBench_Evaluator().eval_result(records, eval_method="static")
    counts = Counter(r["category"] for r in records if r["index"] < 1_000_000)  # >= 1e6: circular copies
    return {name: {"score": 100 * float(accuracy[name]), "n": counts[name]} for name in sorted(accuracy)}


def _headline(task_results: dict[str, Any], metric: str) -> tuple[str, float | None]:
    """lmms-eval keys metrics `name,filter`; pick the benchmark's metric under whichever filter ran."""
    for key, value in task_results.items():
        if key.split(",", 1)[0] == metric and isinstance(value, (int, float)):
            return key, float(value)
    return metric, None


def load_summary(summary: dict[str, Any] | str | Path) -> dict[str, Any]:
    """A summary given as a dict, a `summary.json` or the folder holding one."""
    if isinstance(summary, dict):
        data = summary
    else:
        path = Path(summary)
        if path.is_dir():
            path = path / SUMMARY
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DsvlmError(f"cannot read eval summary {path}: {exc}") from exc
    if not isinstance(data.get("benchmarks"), dict):
        raise DsvlmError("not a dsvlm eval summary (no `benchmarks`)")
    return data
