"""The bundled paper recipes at their real shapes, end to end on CPU, through the real command line.

For each recipe (`llava15-vicuna7b-ds`, `siglip-qwen2-ds`) it builds randomly initialised components with the
real architectures (`_paper_shapes.py`: CLIP ViT-L/14-336 or SigLIP-SO400M/384, Vicuna-7B or Qwen2-7B width with
the LLM's layer count cut to `--llm-layers`, SD 1.5 UNet + VAE + scheduler config, an offline tokenizer with the
real special tokens), prepares a few dozen LLaVA-format records with real-size images (640x480 JPEG), and runs
`dsvlm train RECIPE` stage by stage with supervision (`ds`) and without (`plain`, `supervision.enabled=false`),
then `dsvlm strip` and `dsvlm eval` (a local MMBench-format parquet) on the `ds` run. `llava15-vicuna7b-ds-lora`
differs in stage 2 only: it runs that stage from the paper recipe's stage-1 output (run that recipe first).
`--stages instruct` reruns stage 2 alone from an earlier run's stage 1.

Only these recipe fields are overridden: the `pretrained:` paths, `data.dataset`, `run.output_dir`, the step
counts (`max_steps`, `run.log_every=1`), the batch sizes (1 per step) and the end-of-stage preview's size
(`run.preview_images=1`, `supervision.sampler_steps=2`: the 4-image, 50-step DDIM grid alone would take longer
than the training steps here). Each stage runs in its own process, whose peak RSS is the kernel's `VmHWM`
sampled every 0.25 s; a child is killed when the machine's available memory falls under `--min-free-gib`.
Step times are `step_time_s` of the stage's metrics.jsonl (the first step includes lazy initialisation).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/real_shapes.py --json real_shapes.json   # ~25 min, 2 cores
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _paper_shapes as shapes
import psutil
from _common import command_line, loadavg, machine, stderr_console, write_report
from rich.table import Table

RECIPES: dict[str, dict[str, Any]] = {
    "llava15-vicuna7b-ds": {"vision": "clip", "llm": "llama", "tokenizer": shapes.llama_tokenizer},
    "siglip-qwen2-ds": {"vision": "siglip", "llm": "qwen2", "tokenizer": shapes.qwen2_tokenizer},
    # Differs from the paper recipe in stage 2 only (LoRA on the LLM): its components and its stage 1 output
    # are the paper recipe's, so it runs stage 2 from that run's align/final (run the paper recipe first).
    "llava15-vicuna7b-ds-lora": {
        "vision": "clip",
        "llm": "llama",
        "tokenizer": shapes.llama_tokenizer,
        "stage1_of": "llava15-vicuna7b-ds",
    },
}
STAGES = ("align", "instruct")
ARMS = {"ds": [], "plain": ["supervision.enabled=false"]}
CAPTIONS = [
    "A red car parked on a quiet street.",
    "Two people walking a dog on the beach.",
    "A cat sleeping on a sofa near the window.",
    "A plate with a sandwich and fries.",
]
QUESTIONS = [
    ("What is in the image?", "A car on a street, parked near the side."),
    ("How many objects are there?", "There are three objects."),
    ("Describe the image in detail.", "The scene is a kitchen with a wooden table and a window."),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/real-shapes"), help="Components, data and runs.")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="Comma-separated bundled recipes.")
    # The defaults fit 23.5 GiB: with 2 layers, or Qwen2's full 152,064-row vocabulary, stage 2 does not.
    parser.add_argument("--llm-layers", type=int, default=1, help="Decoder layers of the LLM (full width).")
    parser.add_argument("--qwen2-vocab", type=int, default=32000, help="Cut Qwen2's vocabulary (0: the full 152 K).")
    parser.add_argument("--arms", default="ds,plain", help="ds (supervision on) and/or plain (off).")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="align and/or instruct; instruct alone starts from an earlier run's align/final.",
    )
    parser.add_argument("--steps", type=int, default=2, help="Optimizer steps per stage.")
    parser.add_argument("--no-strip-eval", action="store_true", help="Train only: no strip and eval of the ds run.")
    parser.add_argument("--n-records", type=int, default=24, help="Records per split.")
    parser.add_argument("--eval-items", type=int, default=4, help="MMBench-format items evaluated.")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the children.")
    parser.add_argument("--min-free-gib", type=float, default=1.0, help="Kill a child under this much free memory.")
    parser.add_argument("--precision", default="bf16", help="stages.N.precision (bf16 where the CPU has it).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the report to this file.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    console = stderr_console()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": command_line(),
        "machine": machine(),
        "loadavg_start": loadavg(),
        "llm_layers": args.llm_layers,
        "steps": args.steps,
        "threads": args.threads,
        "precision": args.precision,
        "recipes": {},
    }
    data = prepare_data(work, args.n_records)
    eval_file = mmbench_parquet(work / "eval" / "mmbench.parquet", args.eval_items)
    diffusion = built(work / "components" / "sd15", shapes.stable_diffusion)
    for name in args.recipes.split(","):
        report["recipes"][name] = run_recipe(name, args, work, data, eval_file, diffusion, console)
        write_report(args.json, report)
    report["loadavg_end"] = loadavg()
    write_report(args.json, report)
    console.print(summary_table(report))
    print(json.dumps(report, indent=2))


def built(out: Path, build: Any, *args: Any, **kwargs: Any) -> Path:
    """`build(out, ...)` unless `out` already holds a finished build (a `.done` marker)."""
    marker = out / ".done"
    if not marker.exists():
        started = time.perf_counter()
        build(out, *args, **kwargs)
        marker.write_text(f"{time.perf_counter() - started:.1f}\n")
    return out


def prepare_data(work: Path, n: int) -> Path:
    """`n` caption and `n` chat records in LLaVA format over 640x480 JPEGs, through `dsvlm prepare llava`."""
    out = work / "data" / "llava"
    if (out / "manifest.json").exists():
        return out
    raw = work / "data" / "raw"
    (raw / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    align, instruct = [], []
    for i in range(n):
        rel = f"images/{i:04d}.jpg"
        photo(rng).save(raw / rel, quality=90)
        align.append(
            {
                "id": f"a{i}",
                "image": rel,
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image briefly."},
                    {"from": "gpt", "value": CAPTIONS[i % len(CAPTIONS)]},
                ],
            }
        )
        question, reply = QUESTIONS[i % len(QUESTIONS)]
        instruct.append(
            {
                "id": f"i{i}",
                "image": rel,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": reply},
                    {"from": "human", "value": "Is there a person in the image?"},
                    {"from": "gpt", "value": "Yes, a man is riding a bicycle."},
                ],
            }
        )
    (raw / "align.json").write_text(json.dumps(align))
    (raw / "instruct.json").write_text(json.dumps(instruct))
    dsvlm_command(
        [
            "prepare",
            "llava",
            str(out),
            "--align",
            str(raw / "align.json"),
            "--instruct",
            str(raw / "instruct.json"),
            "--image-root",
            str(raw),
        ],
        work / "logs" / "prepare.log",
        1,
    )
    return out


def photo(rng: random.Random, size: tuple[int, int] = (640, 480)) -> Any:
    """A real-size picture: a colour gradient with a few filled shapes (JPEG-compressible, not noise)."""
    from PIL import Image, ImageDraw

    base = Image.linear_gradient("L").resize(size).convert("RGB")
    tint = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    picture = Image.blend(base, tint, 0.6)
    draw = ImageDraw.Draw(picture)
    for _ in range(3):
        x, y = rng.randrange(size[0] - 120), rng.randrange(size[1] - 120)
        draw.ellipse(
            (x, y, x + rng.randrange(40, 120), y + rng.randrange(40, 120)),
            fill=tuple(rng.randrange(256) for _ in range(3)),
        )
    return picture


def mmbench_parquet(path: Path, n: int) -> Path:
    """`n` MMBench-dev-format items (lmms-eval's mmbench_en_dev_static columns) with 640x480 images."""
    if path.exists():
        return path
    import datasets

    rng = random.Random(1)
    rows = []
    for i in range(n):
        buffer = io.BytesIO()
        photo(rng).save(buffer, format="JPEG", quality=90)
        rows.append(
            {
                "index": i,
                "question": "What colour is the largest shape?",
                "hint": None,
                "A": "red",
                "B": "green",
                "C": "blue",
                "D": "yellow",
                "answer": "ABCD"[i % 4],
                "category": "color",
                "L2-category": "perception",
                "source": "real_shapes",
                "split": "dev",
                "image": {"bytes": buffer.getvalue(), "path": None},
            }
        )
    dataset = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})
    dataset = dataset.cast_column("image", datasets.Image())
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(path))
    return path


def build_components(
    name: str, work: Path, llm_layers: int, qwen2_vocab: int | None
) -> tuple[Path, Path, dict[str, Any]]:
    """The recipe's vision encoder and LLM (layers cut to `llm_layers`, Qwen2's vocabulary to `qwen2_vocab`)
    under WORK/components/, built once: their paths and the LLM's cut."""
    spec = RECIPES[name]
    components = work / "components" / spec.get("stage1_of", name)
    tokenizer = built(components / "tokenizer", spec["tokenizer"], shapes.corpus())
    vision = built(components / "vision", shapes.vision_encoder, spec["vision"])
    cut: dict[str, Any] = {"num_hidden_layers": llm_layers}
    if spec["llm"] == "qwen2" and qwen2_vocab:
        cut["vocab_size"] = qwen2_vocab
    llm = built(
        components / f"llm-{llm_layers}l-{cut.get('vocab_size', 'full')}", shapes.llm, spec["llm"], tokenizer, **cut
    )
    return vision, llm, cut


def run_recipe(
    name: str, args: argparse.Namespace, work: Path, data: Path, eval_file: Path, diffusion: Path, console: Any
) -> dict[str, Any]:
    stage1_of = RECIPES[name].get("stage1_of", name)
    vision, llm, cut = build_components(name, work, args.llm_layers, args.qwen2_vocab)
    result: dict[str, Any] = {"vision": str(vision), "llm": str(llm), "llm_config": cut, "arms": {}}
    for arm in args.arms.split(","):
        run_dir = work / "runs" / f"{name}-{arm}"
        common = shapes.recipe_overrides(vision, llm, diffusion, data, run_dir, *ARMS[arm])
        for i in range(len(STAGES)):
            common += [
                f"stages.{i}.max_steps={args.steps}",
                f"stages.{i}.global_batch_size=1",
                f"stages.{i}.per_device_batch_size=1",
                f"stages.{i}.precision={args.precision}",
            ]
        stages: dict[str, Any] = {}
        selected = [
            stage
            for stage in STAGES
            if stage in args.stages.split(",") and not (stage == "align" and stage1_of != name)
        ]
        for stage in selected:
            align_dir = run_dir if "align" in selected else work / "runs" / f"{stage1_of}-{arm}"
            extra = ["--init", str(align_dir / "align" / "final")] if stage == "instruct" else []
            log = work / "logs" / f"{name}-{arm}-{stage}.log"
            console.print(f"[bold]{name} {arm} {stage}[/]: running (log {log})")
            outcome = dsvlm_command(
                ["train", name, *common, "--stage", stage, "--no-progress", "--overwrite", *extra],
                log,
                args.threads,
                args.min_free_gib,
            )
            outcome.update(metrics_summary(run_dir / stage / "metrics.jsonl"))
            stages[stage] = outcome
            console.print(f"  {stage}: {outcome}")
            write_partial(args, name, arm, stages)
            if outcome["rc"]:
                break
        result["arms"][arm] = {"run": str(run_dir), "stages": stages}
        finished = [stage for stage, got in stages.items() if got["rc"] == 0]
        # the last stage that finished (stage 2 may not fit in memory)
        if arm == "ds" and finished and not args.no_strip_eval:
            result["stripped_stage"] = finished[-1]
            result["strip"], result["eval"] = strip_and_eval(
                run_dir / finished[-1] / "final", work, name, eval_file, args
            )
    return result


def write_partial(args: argparse.Namespace, name: str, arm: str, stages: dict[str, Any]) -> None:
    """A line per finished stage on stderr as JSON, so a killed run still leaves its figures in the log."""
    print(json.dumps({"partial": {"recipe": name, "arm": arm, "stages": stages}}), file=sys.stderr, flush=True)


def strip_and_eval(
    source: Path, work: Path, name: str, eval_file: Path, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any]]:
    model = work / "models" / name
    strip = dsvlm_command(
        ["strip", str(source), "--out", str(model), "--overwrite", "--json"],
        work / "logs" / f"{name}-strip.log",
        args.threads,
        args.min_free_gib,
        keep_stdout=True,
    )
    if strip["rc"]:
        return strip, {"skipped": "strip failed"}
    strip["report"] = json_stdout(strip)
    evaluation = dsvlm_command(
        [
            "eval",
            str(model),
            "--bench",
            "mmbench",
            "--data-files",
            f"mmbench={eval_file}",
            "--out",
            str(work / "eval" / name),
            "--batch-size",
            "2",
            "--max-new-tokens",
            "4",
            "--json",
        ],
        work / "logs" / f"{name}-eval.log",
        args.threads,
        args.min_free_gib,
        keep_stdout=True,
    )
    if not evaluation["rc"]:
        summary = json_stdout(evaluation)
        evaluation["summary"] = {k: v for k, v in summary.items() if k != "compare"}
    return strip, evaluation


def json_stdout(outcome: dict[str, Any]) -> Any:
    """The JSON a `--json` command printed; lines before it (a library printing on stdout) are kept as
    `stdout_noise`, since a pipeline reading that stdout would break on them."""
    text = outcome.pop("stdout")
    start = text.find("\n{") + 1 if not text.startswith("{") else 0
    if start:
        outcome["stdout_noise"] = text[:start].strip().splitlines()
    return json.loads(text[start:])


def dsvlm_command(
    cmd: list[str], log: Path, threads: int, min_free_gib: float = 3.0, keep_stdout: bool = False
) -> dict[str, Any]:
    """Run `python -m dsvlm CMD` with stderr to `log`; rc, wall time, the child's peak RSS (VmHWM), the
    machine's lowest available memory, and on failure the last lines of its log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with log.open("w") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "dsvlm", *cmd], stdout=subprocess.PIPE, stderr=err, env=env, text=True
        )
        watch = Watch(child.pid, min_free_gib)
        watch.start()
        stdout, _ = child.communicate()
        watch.stop()
    outcome: dict[str, Any] = {
        "rc": child.returncode,
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_gib": round(watch.peak_kib / 2**20, 2),
        "peak_anon_gib": round(watch.peak_anon_kib / 2**20, 2),
        "min_available_gib": round(watch.min_available / 2**30, 2),
    }
    if watch.killed:
        outcome["killed"] = f"available memory under {min_free_gib} GiB"
    if child.returncode:
        outcome["error_tail"] = log.read_text().strip().splitlines()[-6:]
    if keep_stdout:
        outcome["stdout"] = stdout
    return outcome


class Watch(threading.Thread):
    """Samples the child's VmHWM (peak RSS, monotone in the kernel; it counts the memory-mapped safetensors
    pages too, which the kernel can drop), its RssAnon (the memory it really holds; peak of the samples) and the
    machine's available memory; kills the child if the latter falls under the floor (other jobs share it)."""

    def __init__(self, pid: int, min_free_gib: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.floor = pid, min_free_gib * 2**30
        self.peak_kib, self.peak_anon_kib, self.min_available, self.killed = 0, 0, float("inf"), False
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.25):
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                    elif line.startswith("RssAnon:"):
                        self.peak_anon_kib = max(self.peak_anon_kib, int(line.split()[1]))
            except (OSError, ValueError):
                return
            available = psutil.virtual_memory().available
            self.min_available = min(self.min_available, available)
            if available < self.floor and not self.killed:
                self.killed = True
                os.kill(self.pid, 9)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def metrics_summary(path: Path) -> dict[str, Any]:
    """Per-step `step_time_s` (and losses) of a stage's metrics.jsonl."""
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {
        "step_time_s": [r["step_time_s"] for r in records],
        "loss": [round(r["loss"], 4) for r in records],
        **({"loss_rec": [round(r["loss_rec"], 4) for r in records]} if records and "loss_rec" in records[0] else {}),
    }


def summary_table(report: dict[str, Any]) -> Table:
    table = Table(
        title=f"paper recipes at real shapes, LLM cut to {report['llm_layers']} layers, {report['threads']} threads"
    )
    for column in ("recipe", "stage", "ds step s", "plain step s", "ds peak RSS GiB", "plain peak RSS GiB"):
        table.add_column(column)
    for name, result in report["recipes"].items():
        for stage in STAGES:
            cells = []
            for key in ("step_time_s", "peak_rss_gib"):
                for arm in ("ds", "plain"):
                    got = result["arms"].get(arm, {}).get("stages", {}).get(stage, {})
                    value = got.get(key)
                    cells.append(", ".join(map(str, value)) if isinstance(value, list) else str(value or "-"))
            table.add_row(name, stage, cells[0], cells[1], cells[2], cells[3])
    return table


if __name__ == "__main__":
    main()
