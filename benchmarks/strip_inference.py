"""Inference after `dsvlm strip`: the stripped model generates exactly as fast as a plain transformers LLaVA.

    .venv/bin/python benchmarks/strip_inference.py [--max-new-tokens 32] [--repeats 30] [--warmup 2] \
        [--threads N] [--json FILE]

Trains the tiny-synthetic recipe for 2 + 2 steps (`dsvlm train`), strips it (`dsvlm strip --json`), then times
greedy `generate` at batch 1 and batch 8 of
- the stripped model, loaded with `LlavaForConditionalGeneration.from_pretrained`, and
- a plain LLaVA built independently from the same config.json (random weights, same shape),
both with `min_new_tokens = max_new_tokens` (every call decodes the same number of tokens), the same
generation config, sdpa attention, fp32, same prompts (synthetic images + questions, left-padded). Warmed up,
then round-robin (ABBA) per batch size; medians. Also reports the strip report's parameter counts and sizes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    command_line,
    dsvlm,
    loadavg,
    machine,
    median,
    prepare_synthetic,
    ratio_spread,
    round_robin,
    stderr_console,
    write_report,
)
from rich.markup import escape
from rich.table import Table
from transformers import AutoProcessor, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

from dsvlm.data.dataset import PreparedSplit

ATTENTION = "sdpa"
MODELS = ("stripped", "plain")


def train_and_strip(root: Path) -> tuple[Path, dict[str, Any], Path]:
    """A 2+2-step tiny-synthetic run stripped to `root/model`: (model dir, strip report, dataset)."""
    data = prepare_synthetic(root / "data", n_align=64, n_instruct=64, n_eval=16)
    run = root / "run"
    dsvlm(
        "train",
        "tiny-synthetic",
        f"data.dataset={data}",
        f"run.output_dir={run}",
        "stages.0.max_steps=2",
        "stages.1.max_steps=2",
        "--no-progress",
    )
    model = root / "model"
    report = json.loads(dsvlm("strip", str(run), "--out", str(model), "--json"))
    return model, report, data


def prompts(processor: Any, data: Path, n: int) -> list[tuple[str, Any]]:
    """(chat prompt, image) of the first `n` imaged instruct records: their first question."""
    split = PreparedSplit(data, "instruct")
    out = []
    for i in range(len(split)):
        example = split[i]
        if example["image"] is None:
            continue
        question = example["conversations"][0]["value"].replace("<image>", "").strip()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        out.append((processor.apply_chat_template(messages, add_generation_prompt=True), example["image"]))
        if len(out) == n:
            return out
    raise ValueError(f"{data} has fewer than {n} imaged instruct records")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Tokens every generate call decodes.")
    parser.add_argument("--repeats", type=int, default=30, help="Timed rounds per model and batch size.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed calls per model and batch size first.")
    parser.add_argument("--batch-sizes", default="1,8", help="Comma-separated generation batch sizes.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    console = stderr_console()
    report: dict[str, Any] = {
        "command": command_line(),
        "machine": machine(),
        "load_start": loadavg(),
        "max_new_tokens": args.max_new_tokens,
        "attention": ATTENTION,
    }

    with tempfile.TemporaryDirectory(prefix="dsvlm-strip-bench-") as tmp:
        model_dir, strip_report, data = train_and_strip(Path(tmp))
        processor = AutoProcessor.from_pretrained(model_dir)
        processor.tokenizer.padding_side = "left"
        generation = GenerationConfig.from_pretrained(model_dir)
        config = LlavaConfig.from_pretrained(model_dir)
        torch.manual_seed(1)
        models = {
            "stripped": LlavaForConditionalGeneration.from_pretrained(
                model_dir, dtype=torch.float32, attn_implementation=ATTENTION
            ),
            "plain": LlavaForConditionalGeneration._from_config(
                config, dtype=torch.float32, attn_implementation=ATTENTION
            ),
        }
        for model in models.values():
            model.eval()
        items = prompts(processor, data, max(sizes) * 2)

    def inputs(batch_size: int, round_index: int) -> dict[str, torch.Tensor]:
        start = (round_index * batch_size) % len(items)
        chosen = [items[(start + k) % len(items)] for k in range(batch_size)]
        return processor(
            text=[p for p, _ in chosen], images=[im for _, im in chosen], padding=True, return_tensors="pt"
        )

    def generate(name: str, batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = models[name].generate(
                **batch,
                generation_config=generation,
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens,
                do_sample=False,
            )
        seconds = time.perf_counter() - start
        new = out.shape[1] - batch["input_ids"].shape[1]
        if new != args.max_new_tokens:
            raise RuntimeError(f"{name} generated {new} tokens, not {args.max_new_tokens}")
        return seconds

    times: dict[tuple[str, int], list[float]] = {(m, b): [] for b in sizes for m in MODELS}
    for b in sizes:
        for name in MODELS:
            for w in range(args.warmup):
                generate(name, inputs(b, w))
        for r in range(args.repeats):
            batch = inputs(b, r)  # the same prompts for both models within a round
            for name in round_robin(MODELS, r):
                times[name, b].append(generate(name, batch))

    rows = []
    for b in sizes:
        plain = times["plain", b]
        for name in MODELS:
            mine = times[name, b]
            rows.append(
                {
                    "model": name,
                    "batch_size": b,
                    "latency_s_median": round(median(mine), 4),
                    "latency_s_all": [round(t, 4) for t in mine],
                    "tokens_per_s": round(b * args.max_new_tokens / median(mine), 1),
                    "latency_ratio_vs_plain": round(median(mine) / median(plain), 3),
                    "latency_ratio_rounds": ratio_spread(mine, plain),
                }
            )
    report.update(
        strip=strip_report,
        params_removed_fraction=round(strip_report["params_removed"] / strip_report["params_before"], 4),
        runs=rows,
        load_end=loadavg(),
    )

    table = Table(
        "model",
        "batch",
        "latency s (median)",
        "new tokens/s",
        escape("x plain (rounds: median [p25-p75])"),
        title=f"greedy generate, {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads, "
        f"{args.repeats} rounds",
    )
    for row in rows:
        spread = row["latency_ratio_rounds"]
        table.add_row(
            row["model"],
            str(row["batch_size"]),
            f"{row['latency_s_median']:.4f}",
            f"{row['tokens_per_s']:.1f}",
            escape(
                f"{row['latency_ratio_vs_plain']:.3f} ({spread['median']:.3f} [{spread['p25']:.3f}-"
                f"{spread['p75']:.3f}])"
            ),
        )
    console.print(table)
    s = strip_report
    table = Table("", "parameters", "MB on disk", title="dsvlm strip: training output vs stripped model")
    table.add_row("before (VLM + branch)", f"{s['params_before']:,}", f"{s['bytes_before'] / 1e6:.2f}")
    table.add_row("after (plain LLaVA)", f"{s['params_after']:,}", f"{s['bytes_after'] / 1e6:.2f}")
    table.add_row(
        "removed",
        f"{s['params_removed']:,} ({report['params_removed_fraction']:.1%})",
        f"{(s['bytes_before'] - s['bytes_after']) / 1e6:.2f}",
    )
    console.print(table)
    console.print(f"load average: start {report['load_start']}, end {report['load_end']}")
    write_report(args.json, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
