"""Eval throughput: the dsvlm lmms-eval model at batch 1 and batch 8 vs lmms-eval's own `llava_hf`
(batch 1), on the same tiny model and the synthetic task, in one process.

    .venv/bin/python benchmarks/eval_throughput.py [--n-eval 96] [--max-new-tokens 16] [--repeats 3] \
        [--threads N] [--json FILE]

The model is the tiny-synthetic recipe's LLaVA with random weights whose answer letters are made likely, so
every answer runs the full `--max-new-tokens` (no early eos): all classes decode the same number of tokens.
`model s/sample` times the classes' `generate_until` only; `end-to-end` is the whole `simple_evaluate`
(dataset loading, scoring, lmms-eval's clean-up). Best of `--repeats` runs each (round-robin), after one
warm-up run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from rich.console import Console
from rich.table import Table

from dsvlm.data.synthetic import SyntheticConfig, generate_synthetic, synthetic_vocabulary
from dsvlm.evaluation.benches import get_benchmark, write_task_yaml
from dsvlm.evaluation.runner import lmms_cli_args, load_model
from dsvlm.model.vlm import build_vlm
from dsvlm.recipe import load_recipe

CONFIGS = [("dsvlm", 1), ("dsvlm", 8), ("llava_hf", 1)]


def build_model(out: Path) -> Path:
    """The tiny-synthetic LLaVA with answer letters made likely (see the module docstring), saved to `out`."""
    vlm, processor = build_vlm(load_recipe("tiny-synthetic").model, seed=0, words=synthetic_vocabulary())
    letters = processor.tokenizer.convert_tokens_to_ids(list("ABCD"))
    with torch.no_grad():
        vlm.get_output_embeddings().weight[letters] *= 30
    vlm.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def run_once(model: str, path: Path, batch_size: int, tasks_dir: Path, task: str, limit: int | None) -> dict:
    """One `simple_evaluate` of `task` with a fresh model: n, model seconds, total seconds, answers."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    # Another class takes device and batch size as its own model args.
    extra = {} if model == "dsvlm" else {"device": "cpu", "device_map": "cpu", "batch_size": batch_size}
    lm = load_model(model, path, batch_size, extra=extra)
    generate = lm.generate_until
    spent = [0.0]

    def timed(requests):  # the model's own work, without lmms-eval's scaffolding
        start = time.perf_counter()
        out = generate(requests)
        spent[0] += time.perf_counter() - start
        return out

    lm.generate_until = timed
    manager = TaskManager("WARNING", include_path=str(tasks_dir), include_defaults=False)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # task aggregations print(); stdout carries the JSON report
        results = simple_evaluate(
            model=lm,
            tasks=[task],
            task_manager=manager,
            limit=limit,
            bootstrap_iters=0,
            log_samples=True,
            cli_args=lmms_cli_args(tasks_dir.parent / "lmms-eval-out"),  # else ./submissions gets written
        )
    total = time.perf_counter() - start
    answers = [s["filtered_resps"][0] for s in results["samples"][task]]
    return {"n": len(answers), "model_s": spent[0], "total_s": total, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-eval", type=int, default=96, help="Synthetic eval items.")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="Tokens generated per answer.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per configuration (best kept).")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's). On a shared machine 1 thread is steadier.",
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsvlm-eval-bench-") as tmp:
        root = Path(tmp)
        model_dir = build_model(root / "model")
        data = generate_synthetic(root / "data", SyntheticConfig(n_align=1, n_instruct=1, n_eval=args.n_eval))["eval"]
        tasks_dir = root / "tasks"
        tasks_dir.mkdir()
        task = write_task_yaml(get_benchmark("synthetic"), tasks_dir, data.resolve(), args.max_new_tokens)
        run_once("dsvlm", model_dir, 8, tasks_dir, task, limit=8)  # warm-up: imports, dataset cache
        # Round-robin, so load from other processes on the machine hits every configuration alike.
        runs: dict[tuple[str, int], list[dict]] = {config: [] for config in CONFIGS}
        for _ in range(args.repeats):
            for model, batch_size in CONFIGS:
                runs[model, batch_size].append(run_once(model, model_dir, batch_size, tasks_dir, task, None))
        for (model, batch_size), done in runs.items():
            best = min(done, key=lambda r: r["model_s"])
            total = min(r["total_s"] for r in done)
            rows.append(
                {
                    "model": model,
                    "batch_size": batch_size,
                    "n": best["n"],
                    "model_s": round(best["model_s"], 3),
                    "model_s_all": [round(r["model_s"], 3) for r in done],
                    "total_s": round(total, 3),
                    "samples_per_s": round(best["n"] / best["model_s"], 2),
                    "end_to_end_samples_per_s": round(best["n"] / total, 2),
                    "answers": best["answers"],
                }
            )

    reference = rows[-1]["answers"]
    table = Table(
        "model",
        "batch",
        "n",
        "model s",
        "samples/s",
        "end-to-end samples/s",
        "speed-up",
        "same answers",
        title=f"eval throughput: tiny-synthetic LLaVA, {args.n_eval} items, "
        f"{args.max_new_tokens} new tokens, {torch.get_num_threads()} threads",
    )
    for row in rows:
        row["speedup_vs_llava_hf"] = round(row["samples_per_s"] / rows[-1]["samples_per_s"], 2)
        row["same_answers_as_llava_hf"] = row.pop("answers") == reference
        table.add_row(
            row["model"],
            str(row["batch_size"]),
            str(row["n"]),
            f"{row['model_s']:.2f}",
            f"{row['samples_per_s']:.1f}",
            f"{row['end_to_end_samples_per_s']:.1f}",
            f"{row['speedup_vs_llava_hf']:.2f}x",
            str(row["same_answers_as_llava_hf"]),
        )
    console.print(table)
    report = {
        "n_eval": args.n_eval,
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "runs": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
