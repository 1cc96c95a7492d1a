"""Diffusion supervision's step-time overhead at the paper's real shapes on one GPU, in one run.

Builds `llava15-vicuna7b-ds`'s components at full size (CLIP ViT-L/14-336, Vicuna-7B with all 32 layers, SD 1.5
UNet + VAE; random weights, `_paper_shapes.py`, built on the GPU in bf16), prepares LLaVA-format records with
640x480 images, then runs `dsvlm train llava15-vicuna7b-ds` (bf16, the recipe's stages) as: `plain`
(`supervision.enabled=false`) and `ds` at each `--resolutions` (`supervision.resolution`, SD 1.5 at 256 and 512
px). Reports per arm the median `step_time_s` after `--warmup` steps, the child's peak RSS, and ds / plain.
Overridden: pretrained paths, data, output dir, step counts, batch sizes, the preview size.

    bash benchmarks/gpu_overhead.sh gpu_overhead.json          # one GPU; not yet run on one
    .venv/bin/python benchmarks/gpu_overhead.py --smoke --json /tmp/smoke.json   # tiny shapes, CPU, 30 s here
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import _paper_shapes as shapes
from _common import command_line, loadavg, machine, stderr_console, write_report
from real_shapes import built, dsvlm_command, metrics_summary, prepare_data
from rich.table import Table

RECIPE = "llava15-vicuna7b-ds"
# --smoke: the same pipeline at toy widths (24 encoder layers kept: the recipe taps layers 8/16/24).
SMOKE_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "image_size": 56}
SMOKE_LLM = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 2000,
}
SMOKE_UNET = {"block_out_channels": [32, 32, 64, 64], "cross_attention_dim": 32, "layers_per_block": 1}
SMOKE_VAE = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/gpu-overhead"), help="Components, data, runs.")
    parser.add_argument("--smoke", action="store_true", help="Tiny shapes on the CPU (checks the script only).")
    parser.add_argument("--resolutions", default="256,512", help="supervision.resolution of the ds arms.")
    parser.add_argument(
        "--stages",
        default="align",
        help="align and/or instruct (instruct: full fine-tuning of 7B with AdamW, about 120 GB before activations).",
    )
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps per stage.")
    parser.add_argument("--warmup", type=int, default=2, help="Steps left out of the median.")
    parser.add_argument("--batch", type=int, default=16, help="Per-device (= global) batch size.")
    parser.add_argument("--threads", type=int, default=8, help="OMP_NUM_THREADS of the training processes.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the report to this file.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.smoke:
        args.resolutions, args.steps, args.warmup, args.batch = "64,128", 3, 1, 2
    console = stderr_console()
    work = args.work.resolve()
    device = "cpu" if args.smoke else "cuda"
    components = work / ("components-smoke" if args.smoke else "components")
    tokenizer = built(components / "tokenizer", shapes.llama_tokenizer, shapes.corpus())
    vision = built(
        components / "vision", shapes.vision_encoder, "clip", "bfloat16", device, **(SMOKE_VISION if args.smoke else {})
    )
    llm = built(
        components / "llm", shapes.llm, "llama", tokenizer, "bfloat16", device, **(SMOKE_LLM if args.smoke else {})
    )
    diffusion = built(
        components / "sd15",
        shapes.stable_diffusion,
        "bfloat16",
        device,
        SMOKE_UNET if args.smoke else None,
        SMOKE_VAE if args.smoke else None,
    )
    data = prepare_data(work, max(args.steps * args.batch, 8))
    stages = args.stages.split(",")
    arms = {"plain": ["supervision.enabled=false"]} | {
        f"ds-{r}px": [f"supervision.resolution={r}"] for r in args.resolutions.split(",")
    }
    report: dict[str, Any] = {
        "command": command_line(),
        "machine": machine(),
        "loadavg_start": loadavg(),
        "smoke": args.smoke,
        "recipe": RECIPE,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch": args.batch,
        "arms": {},
    }
    for arm, extra in arms.items():
        run_dir = work / "runs" / arm
        common = shapes.recipe_overrides(vision, llm, diffusion, data, run_dir, *extra)
        for i in range(2):
            common += [
                f"stages.{i}.max_steps={args.steps}",
                f"stages.{i}.global_batch_size={args.batch}",
                f"stages.{i}.per_device_batch_size={args.batch}",
            ]
        report["arms"][arm] = {}
        for stage in stages:
            init = ["--init", str(run_dir / "align" / "final")] if stage == "instruct" else []
            console.print(f"{arm} {stage}: running")
            outcome = dsvlm_command(
                ["train", RECIPE, *common, "--stage", stage, "--no-progress", "--overwrite", *init],
                work / "logs" / f"{arm}-{stage}.log",
                args.threads,
            )
            outcome.update(metrics_summary(run_dir / stage / "metrics.jsonl"))
            times = outcome.get("step_time_s", [])[args.warmup :]
            outcome["median_step_s"] = round(statistics.median(times), 4) if times else None
            report["arms"][arm][stage] = outcome
            write_report(args.json, report)
    report["ratio_vs_plain"] = {
        arm: {stage: ratio(report["arms"][arm].get(stage), report["arms"]["plain"].get(stage)) for stage in stages}
        for arm in arms
        if arm != "plain"
    }
    report["loadavg_end"] = loadavg()
    write_report(args.json, report)
    console.print(table(report, stages))
    print(json.dumps(report, indent=2))


def ratio(ds: dict[str, Any] | None, plain: dict[str, Any] | None) -> float | None:
    if not ds or not plain or not ds.get("median_step_s") or not plain.get("median_step_s"):
        return None
    return round(ds["median_step_s"] / plain["median_step_s"], 3)


def table(report: dict[str, Any], stages: list[str]) -> Table:
    smoke = " (smoke)" if report["smoke"] else ""
    out = Table(title=f"{report['recipe']} step time, batch {report['batch']}{smoke}")
    for column in ("arm", "stage", "median step s", "x plain", "peak RSS GiB", "rc"):
        out.add_column(column)
    for arm, by_stage in report["arms"].items():
        for stage in stages:
            got = by_stage.get(stage, {})
            out.add_row(
                arm,
                stage,
                str(got.get("median_step_s")),
                str(report.get("ratio_vs_plain", {}).get(arm, {}).get(stage, "-")),
                str(got.get("peak_rss_gib")),
                str(got.get("rc")),
            )
    return out


if __name__ == "__main__":
    main()
