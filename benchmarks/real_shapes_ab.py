"""Step time with and without diffusion supervision at the paper recipes' real shapes, in one process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/real_shapes_ab.py [--llm-layers 1] [--qwen2-vocab 32000] \
        [--recipes llava15-vicuna7b-ds,siglip-qwen2-ds] [--stages align,instruct] [--rounds 8] [--warmup 2] \
        [--json FILE]

`real_shapes.py` runs each arm as its own `dsvlm train` process, minutes apart on a shared machine, two steps each:
its supervised/plain ratios rest on one step pair. Here one process per (recipe, stage) builds the recipe's
supervised model once, from the same components, data and overrides as `real_shapes.py` (built under `--work` if
missing), and times the trainer's own optimizer step (`dsvlm.train.loop._optimizer_step`: forward under the
stage's autocast, backward, clipping, AdamW, zero_grad) on the same model and the same batch, with the branch on
(`ds`) and off (`plain`: the step a plain LLaVA takes; the branch's parameters get no gradient, so AdamW skips
them). `--warmup` untimed steps of each, then `--rounds` rounds in ABBA order, the batch changing per round. The stage's
precision, frozen-weight dtype and gradient checkpointing are the recipe's, as `dsvlm train` sets them; batch 1,
no latent cache (the VAE encoder runs every supervised step, as in `real_shapes.py`). Peak anonymous RSS of each
child is sampled from /proc; a child is killed under `--min-free-gib` of available memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _paper_shapes as shapes
from _common import command_line, loadavg, machine, stderr_console, write_report
from real_shapes import STAGES, Watch, build_components, built, prepare_data
from rich.table import Table

RECIPES = ("llava15-vicuna7b-ds", "siglip-qwen2-ds")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/real-shapes"), help="Components and data.")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="Comma-separated bundled recipes.")
    parser.add_argument("--stages", default=",".join(STAGES), help="Comma-separated stages.")
    parser.add_argument("--llm-layers", type=int, default=1, help="Decoder layers of the LLM (full width).")
    parser.add_argument("--qwen2-vocab", type=int, default=32000, help="Qwen2's vocabulary cut (0: the full 152 K).")
    parser.add_argument("--rounds", type=int, default=8, help="Timed ABBA rounds (one ds and one plain step each).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps of each arm first.")
    parser.add_argument("--n-records", type=int, default=24, help="Records per split of the prepared data.")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the children.")
    parser.add_argument("--precision", default="bf16", help="stages.N.precision (bf16 where the CPU has it).")
    parser.add_argument("--min-free-gib", type=float, default=1.0, help="Kill a child under this much free memory.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the report to this file.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    console = stderr_console()
    work = args.work.resolve()
    report: dict[str, Any] = {
        "command": command_line(),
        "machine": machine(),
        "loadavg_start": loadavg(),
        "llm_layers": args.llm_layers,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "precision": args.precision,
        "results": {},
    }
    data = prepare_data(work, args.n_records)
    diffusion = built(work / "components" / "sd15", shapes.stable_diffusion)
    for name in args.recipes.split(","):
        vision, llm, _ = build_components(name, work, args.llm_layers, args.qwen2_vocab or None)
        overrides = shapes.recipe_overrides(vision, llm, diffusion, data, work / "runs" / f"{name}-ab")
        for i in range(len(STAGES)):
            overrides += [f"stages.{i}.precision={args.precision}", f"stages.{i}.per_device_batch_size=1"]
        for stage in args.stages.split(","):
            console.print(f"[bold]{name} {stage}[/]: timing ds vs plain in one process")
            job = {"recipe": name, "stage": stage, "overrides": overrides, "rounds": args.rounds, "warmup": args.warmup}
            result = run_child(job, args.threads, args.min_free_gib)
            report["results"][f"{name}/{stage}"] = result
            console.print(f"  {result}")
            write_report(args.json, report)
    report["loadavg_end"] = loadavg()
    write_report(args.json, report)
    console.print(summary_table(report))
    print(json.dumps(report, indent=2))


def run_child(job: dict[str, Any], threads: int, min_free_gib: float) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    watch = Watch(child.pid, min_free_gib)
    watch.start()
    stdout, stderr = child.communicate()
    watch.stop()
    if child.returncode:
        reason = "killed: low memory" if watch.killed else stderr.decode(errors="replace").strip().splitlines()[-5:]
        return {"rc": child.returncode, "error": reason}
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    result["peak_anon_gib"] = round(watch.peak_anon_kib / 2**20, 2)
    result["min_available_gib"] = round(watch.min_available / 2**30, 2)
    return result


def child(job: dict[str, Any]) -> None:
    """Build the supervised model of one stage, then time its optimizer step with the branch on and off."""
    import torch
    from transformers import get_scheduler

    from dsvlm.data.dataset import PreparedSplit
    from dsvlm.data.synthetic import synthetic_vocabulary
    from dsvlm.model.collate import Collator
    from dsvlm.model.dsvlm import build_model
    from dsvlm.model.freeze import freeze_for_stage
    from dsvlm.recipe import load_recipe
    from dsvlm.train import loop
    from dsvlm.train.throughput import BranchFlops

    recipe = load_recipe(job["recipe"], job["overrides"])
    stage = recipe.stage(job["stage"])
    started = time.perf_counter()
    accelerator = loop._accelerator(stage)
    model = build_model(recipe, words=synthetic_vocabulary(), llm_lora=stage.llm_lora)
    freeze_for_stage(model, stage.train)
    if stage.gradient_checkpointing:
        model.vlm.activation_checkpointing_enable()
    collator = Collator(
        model.processor,
        stage.template_name,
        recipe.data.max_length,
        rec_resolution=recipe.supervision.resolution,
        image_aspect_ratio=recipe.model.image_aspect_ratio,
    )
    loop._hold_frozen_in_stage_precision(model, stage, accelerator)
    split = PreparedSplit(Path(stage.dataset or recipe.data.dataset), stage.split_name)
    batches = [collator([split[i]]) for i in range(4)]
    optimizer = torch.optim.AdamW(loop._param_groups(model, stage), lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = get_scheduler("constant", optimizer)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    trainable = [p for p in model.parameters() if p.requires_grad]
    flops = BranchFlops(loop._unwrapped(model))
    built_s = time.perf_counter() - started

    def step(supervise: bool, index: int) -> float:
        batch = dict(batches[index % len(batches)])  # the step writes its noise seeds into the batch
        begin = time.perf_counter()
        seed = recipe.run.seed
        loop._optimizer_step(
            accelerator, model, optimizer, scheduler, trainable, [batch], stage, supervise, seed, index, flops
        )
        return time.perf_counter() - begin

    warmup: dict[str, list[float]] = {"ds": [], "plain": []}
    for w in range(job["warmup"]):
        for arm in warmup:
            warmup[arm].append(round(step(arm == "ds", w), 2))
    times: dict[str, list[float]] = {"ds": [], "plain": []}
    for r in range(job["rounds"]):
        for arm in ("ds", "plain") if r % 2 == 0 else ("plain", "ds"):
            times[arm].append(step(arm == "ds", job["warmup"] + r))
    ratios = [d / p for d, p in zip(times["ds"], times["plain"], strict=True)]
    print(
        json.dumps(
            {
                "build_s": round(built_s, 1),
                "trainable_m": round(sum(p.numel() for p in trainable) / 1e6, 1),
                "warmup_s": warmup,
                "ds_s": [round(t, 2) for t in times["ds"]],
                "plain_s": [round(t, 2) for t in times["plain"]],
                "ds_median_s": round(statistics.median(times["ds"]), 2),
                "plain_median_s": round(statistics.median(times["plain"]), 2),
                "ratio_per_round": [round(x, 2) for x in ratios],
                "ratio_median": round(statistics.median(ratios), 2),
            }
        )
    )


def summary_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"ds vs plain step, one process, LLM cut to {report['llm_layers']} layers")
    columns = ("recipe/stage", "ds s (median)", "plain s (median)", "ds/plain per round", "median", "peak anon GiB")
    for column in columns:
        table.add_column(column)
    for key, got in report["results"].items():
        if got.get("rc"):
            table.add_row(key, "failed", "", "", "", "")
            continue
        table.add_row(
            key,
            str(got["ds_median_s"]),
            str(got["plain_median_s"]),
            ", ".join(map(str, got["ratio_per_round"])),
            str(got["ratio_median"]),
            str(got["peak_anon_gib"]),
        )
    return table


if __name__ == "__main__":
    main()
