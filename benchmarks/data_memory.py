"""Memory of the training data side at LLaVA-1.5's size, and the loader's speed next to a training step.

    .venv/bin/python benchmarks/data_memory.py [--sizes 66500,665000] [--workers 0,4] [--batches 200] \
        [--batch-size 16] [--data-dir DIR] [--repeats 5] [--python-records-max 66500] [--threads N] [--json FILE]

Memory: a text-only prepared set per size in `--sizes` (665,000 records is LLaVA-1.5's instruct mix), written
in the prepared format (parquet + the Arrow copy `dsvlm prepare` writes), conversations of LLaVA-like length.
Each (size, workers) runs in a fresh process that builds what training builds: tiny-synthetic's Collator, the
`PreparedSplit`, the epoch sampler and the DataLoader (persistent workers), then iterates `--batches` batches
in a random order. Sampled every 10 ms: the main process's RSS and its anonymous part (RSS less file-backed
pages: the mapped file's pages count in RSS once touched, but they are the kernel's page cache, shared by every
process and reclaimable) and every worker's RSS, anonymous RSS and USS (its own pages; file pages only it has
touched count here too). Increases are
over the RSS once the collator is built. The "Python records" row is the reader this replaced (all records
as dicts in the main process; forked workers copy the pages their refcounts touch).

Speed: on a small synthetic set with images, samples/s of the loader alone (images decoded, collated for the
diffusion branch) at each worker count, and of tiny-synthetic's optimizer step (text-only baseline and
diffusion-supervised, batch 32; `train_overhead.py`'s step), medians of `--repeats` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from _common import command_line, loadavg, machine, median, prepare_synthetic, stderr_console, write_report

SPLIT = "instruct"
WORDS = [
    "the",
    "a",
    "image",
    "shows",
    "person",
    "car",
    "dog",
    "table",
    "red",
    "blue",
    "left",
    "right",
    "what",
    "where",
    "is",
    "are",
    "of",
    "on",
    "in",
    "with",
    "describe",
    "detail",
    "scene",
    "background",
    "color",
    "number",
    "people",
    "looking",
    "sitting",
    "standing",
]


def write_text_only_set(out: Path, records: int, chunk: int = 50_000) -> Path:
    """A text-only prepared set of `records` records (seeded), written chunk by chunk. Reused if present."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dsvlm.data.common import FORMAT_VERSION, PARQUET_SCHEMA
    from dsvlm.data.prepared import write_arrow_copy

    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text())["splits"][SPLIT]["records"] == records:
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(records)
    parquet = out / f"{SPLIT}.parquet"
    with pq.ParquetWriter(parquet, PARQUET_SCHEMA) as writer:
        for start in range(0, records, chunk):
            ids, turns, lengths = [], [], []
            for i in range(start, min(records, start + chunk)):
                # 1-4 rounds of a ~12-word question and a ~60-word answer: about LLaVA-665K's mean length
                rounds = []
                for _ in range(rng.randint(1, 4)):
                    rounds += [
                        {"from": "human", "value": " ".join(rng.choices(WORDS, k=rng.randint(4, 20)))},
                        {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(10, 110)))},
                    ]
                ids.append(f"r{i}")
                turns.append(json.dumps(rounds))
                lengths.append(sum(len(t["value"].split()) for t in rounds))
            n = len(ids)
            writer.write_table(
                pa.table(
                    {
                        "id": ids,
                        "image": [None] * n,
                        "conversations": turns,
                        "width": [None] * n,
                        "height": [None] * n,
                        "length": lengths,
                    },
                    schema=PARQUET_SCHEMA,
                )
            )
    write_arrow_copy(parquet)
    manifest.write_text(
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "kind": "llava",
                "image_root": "images",
                "splits": {SPLIT: {"file": parquet.name, "records": records, "skipped": {}}},
            }
        )
    )
    return out


class TreeMemory:
    """Samples the RSS and anonymous RSS of this process and the RSS and USS of its children (the DataLoader
    workers) every `interval_s`; peaks in MiB."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.me = psutil.Process()
        self.peak = {
            "rss": 0.0,
            "anon": 0.0,
            "worker_rss": 0.0,
            "worker_anon": 0.0,
            "worker_uss": 0.0,
            "workers_anon_sum": 0.0,
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, float]:
        info = self.me.memory_info()
        now = {
            "rss": info.rss / 2**20,
            "anon": (info.rss - info.shared) / 2**20,
            "worker_rss": 0.0,
            "worker_anon": 0.0,
            "worker_uss": 0.0,
            "workers_anon_sum": 0.0,
        }
        for child in self.me.children():
            try:
                full = child.memory_full_info()
            except psutil.Error:  # ended between listing and reading
                continue
            now["worker_rss"] = max(now["worker_rss"], full.rss / 2**20)
            anon = (full.rss - full.shared) / 2**20
            now["worker_anon"] = max(now["worker_anon"], anon)
            now["worker_uss"] = max(now["worker_uss"], full.uss / 2**20)
            now["workers_anon_sum"] += anon
        return now

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in self.sample().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.interval_s)

    def __enter__(self) -> TreeMemory:
        self.start = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tiny_collator(supervise: bool) -> Any:
    """tiny-synthetic's Collator (its model built once for the processor, then dropped)."""
    import gc

    from train_overhead import RECIPE, TINY

    from dsvlm.data.synthetic import synthetic_vocabulary
    from dsvlm.model.collate import Collator
    from dsvlm.model.dsvlm import build_model
    from dsvlm.recipe import load_recipe

    recipe = load_recipe(RECIPE, list(TINY))
    model = build_model(recipe, words=synthetic_vocabulary())  # the inline LLM's word-level tokenizer
    stage = recipe.stage(SPLIT)
    collator = Collator(
        model.processor,
        stage.template_name,
        recipe.data.max_length,
        rec_resolution=recipe.supervision.resolution if supervise else None,
    )
    del model
    gc.collect()
    return collator


def make_loader(split: Any, collator: Any, batch_size: int, workers: int) -> Any:
    """The loader as `dsvlm train` builds it (a plain seeded permutation, persistent workers)."""
    from torch.utils.data import DataLoader

    from dsvlm.train.loop import epoch_sampler

    return DataLoader(
        split,
        batch_size=batch_size,
        sampler=epoch_sampler(split, 0, False, batch_size),
        collate_fn=collator,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def memory_child(job: dict[str, Any]) -> None:
    """One (size, workers) measurement in a fresh process; prints its JSON on the last stdout line."""
    import torch

    from dsvlm.data.dataset import PreparedSplit
    from dsvlm.data.prepared import PreparedDataset

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    collator = tiny_collator(supervise=False)
    with TreeMemory() as memory:
        start = time.perf_counter()
        if job["python_records"]:
            records = PreparedDataset(job["data"]).records(SPLIT)
            batches = len(records) // job["batch_size"]
        else:
            split = PreparedSplit(job["data"], SPLIT)
            opened = time.perf_counter() - start
            loader = make_loader(split, collator, job["batch_size"], job["workers"])
            start = time.perf_counter()
            batches = 0
            for _ in loader:
                batches += 1
                if batches == job["batches"]:
                    break
        seconds = time.perf_counter() - start
    begin = memory.start
    print(
        json.dumps(
            {
                "rss_before_mb": round(begin["rss"], 1),
                "rss_peak_mb": round(memory.peak["rss"], 1),
                "rss_increase_mb": round(memory.peak["rss"] - begin["rss"], 1),
                "anon_increase_mb": round(memory.peak["anon"] - begin["anon"], 1),
                "worker_rss_peak_mb": round(memory.peak["worker_rss"], 1),
                "worker_anon_peak_mb": round(memory.peak["worker_anon"], 1),
                "worker_uss_peak_mb": round(memory.peak["worker_uss"], 1),
                "workers_anon_sum_peak_mb": round(memory.peak["workers_anon_sum"], 1),
                "batches": batches,
                "open_s": None if job["python_records"] else round(opened, 3),
                "samples_per_s": None if job["python_records"] else round(batches * job["batch_size"] / seconds, 1),
            }
        )
    )


def measure_memory(
    data: Path, records: int, workers: int, args: argparse.Namespace, python_records: bool = False
) -> dict[str, Any]:
    job = {
        "data": str(data),
        "workers": workers,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "python_records": python_records,
    }
    done = subprocess.run(
        [sys.executable, __file__, "--memory-child", json.dumps(job)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"memory run ({records} records, {workers} workers) failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {"records": records, "workers": workers, "reader": "Python records" if python_records else "streamed", **row}


def measure_speed(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Loader samples/s (images decoded, collated for the branch) per worker count vs the tiny optimizer step."""
    import torch
    from train_overhead import SETUPS, TEXT_ONLY, ArmRun, arm_recipe

    from dsvlm.data.dataset import PreparedSplit

    if args.threads:
        torch.set_num_threads(args.threads)
    data = prepare_synthetic(work / "images", 16, 512, 8)
    split = PreparedSplit(data, SPLIT)
    collator = tiny_collator(supervise=True)
    batch = 32
    setup = SETUPS["tiny"]
    arms = {"step, text only": TEXT_ONLY, "step, DS (8 of 32 reconstructed)": setup.arms[1]}
    runs = {name: ArmRun(arm_recipe(setup, arm), SPLIT, arm, data, batch, 4) for name, arm in arms.items()}
    for run in runs.values():
        run.step()
    loaders = {f"loader, {w} workers": make_loader(split, collator, batch, w) for w in args.workers}
    per_round = 8  # batches per loader round: past the workers' start, within one epoch (512 / 32 = 16)
    for loader in loaders.values():  # start the persistent workers, fill the page cache
        for _ in zip(range(per_round), loader, strict=False):
            pass
    rates: dict[str, list[float]] = {name: [] for name in [*loaders, *runs]}
    for _ in range(args.repeats):
        for name, loader in loaders.items():
            start = time.perf_counter()
            n = sum(len(b["input_ids"]) for _, b in zip(range(per_round), loader, strict=False))
            rates[name].append(n / (time.perf_counter() - start))
        for name, run in runs.items():
            rates[name].append(batch / run.step())
    return {
        "batch_size": batch,
        "records": len(split),
        "samples_per_s": {name: round(median(values), 1) for name, values in rates.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="66500,665000")
    parser.add_argument("--workers", default="0,4")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the generated sets here (reused)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--python-records-max",
        type=int,
        default=66_500,
        help="measure the old reader only up to this size (~300 MiB per 10,000 records)",
    )
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return
    args.workers = [int(w) for w in args.workers.split(",")]
    report: dict[str, Any] = {"command": command_line(), "machine": machine(), "load_start": loadavg()}
    console = stderr_console()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or Path(tmp)
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            started = time.perf_counter()
            data = write_text_only_set(root / f"text-{size}", size)
            sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in data.glob(f"{SPLIT}.*")}
            console.print(f"{size} records: {sizes} MiB ({time.perf_counter() - started:.0f} s)")
            for workers in args.workers:
                rows.append({**measure_memory(data, size, workers, args), "file_mb": sizes})
            if size <= args.python_records_max:
                rows.append({**measure_memory(data, size, 0, args, python_records=True), "file_mb": sizes})
        report["memory"] = rows
        if not args.no_speed:
            report["speed"] = measure_speed(args, Path(tmp))
    report["load_end"] = loadavg()
    from rich.table import Table

    table = Table(title="data side memory (MiB; increase over the process with the collator built)")
    for column in (
        "records",
        "reader",
        "workers",
        "main RSS +",
        "main anon +",
        "worker RSS",
        "worker anon",
        "worker USS",
        "workers anon sum",
        "samples/s",
    ):
        table.add_column(column, justify="right")
    for row in report["memory"]:
        table.add_row(
            str(row["records"]),
            row["reader"],
            str(row["workers"]),
            str(row["rss_increase_mb"]),
            str(row["anon_increase_mb"]),
            str(row["worker_rss_peak_mb"]),
            str(row["worker_anon_peak_mb"]),
            str(row["worker_uss_peak_mb"]),
            str(row["workers_anon_sum_peak_mb"]),
            str(row["samples_per_s"]),
        )
    console.print(table)
    if "speed" in report:
        speed = Table(title=f"samples/s, batch {report['speed']['batch_size']} (medians)")
        speed.add_column("what")
        speed.add_column("samples/s", justify="right")
        for name, rate in report["speed"]["samples_per_s"].items():
            speed.add_row(name, str(rate))
        console.print(speed)
    print(json.dumps(report, indent=2))
    write_report(args.json, report)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
