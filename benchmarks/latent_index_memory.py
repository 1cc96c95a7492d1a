"""Resident memory of the latent cache's per-image index at LLaVA-1.5's size: the JSON dict of cache version 2 vs
the memory-mapped Arrow table of version 3.

    .venv/bin/python benchmarks/latent_index_memory.py [--images 624000] [--records 665000] [--lookups 20000] \
        [--json FILE]

Writes, in a temporary directory, both indexes for `--images` image paths named like LLaVA-1.5's mix
(coco/train2017/..., gqa/images/..., ocr_vqa/images/..., textvqa/train_images/..., vg/VG_100K/...) and `--records`
record ids, with 1x1x1-latent shards (the latents are memory-mapped safetensors in both versions, not measured
here). Each version is opened in a fresh process, after warming up on a 100-image index (imports, Arrow's kernels
and allocator pools cost per process, not per image): old = `json.loads` of a version-2 index.json (the images and
ids dicts `LatentCache` held; its transient pydantic check left out), new = `LatentCache.open` (its checks
included); then `--lookups` random lookups (dict vs `LatentCache.locate`). Reported: the increase of the process's
RSS and anonymous RSS (RSS less file-backed pages: the mapped tables are the kernel's page cache, shared by every
process) held after opening, the anonymous peak, the pickled size (what each DataLoader worker is sent; forked
workers instead copy the pages their refcounts touch), and the time per lookup.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import command_line, loadavg, machine, stderr_console, write_report
from data_memory import TreeMemory

FINGERPRINT = "0" * 64
RESOLUTION = 8
# LLaVA-1.5's mix: image folders and roughly their share of the 624 K images
FOLDERS = [
    ("coco/train2017/{:012d}.jpg", 0.19),
    ("gqa/images/{}.jpg", 0.24),
    ("ocr_vqa/images/{}.jpg", 0.33),
    ("textvqa/train_images/{:016x}.jpg", 0.04),
    ("vg/VG_100K/{}.jpg", 0.20),
]


def image_paths(count: int) -> list[str]:
    """`count` distinct LLaVA-like image paths (seeded)."""
    rng = random.Random(0)
    paths: set[str] = set()
    while len(paths) < count:
        pattern = rng.choices([f for f, _ in FOLDERS], weights=[w for _, w in FOLDERS])[0]
        paths.add(pattern.format(rng.randrange(10**11)))
    return sorted(paths, key=lambda _: rng.random())


def write_caches(root: Path, images: int, records: int) -> tuple[Path, Path]:
    """A version-2 index.json (old) and a version-3 cache (new) over the same images, ids and shards."""
    import torch
    from safetensors.torch import save_file

    from dsvlm.data.geometry import SquareGeometry
    from dsvlm.data.latents import CACHE_VERSION, LATENTS_DIR, SHARD_SIZE, write_index

    paths = image_paths(images)
    ids = {f"{i:09d}": paths[i % images] for i in range(records)}
    new = root / "new" / LATENTS_DIR
    new.mkdir(parents=True)
    shards = []
    for start in range(0, images, SHARD_SIZE):
        shards.append(f"shard-{len(shards):05d}.safetensors")
        rows = min(images, start + SHARD_SIZE) - start
        save_file({"latents": torch.zeros(rows, 1, 1, 1)}, str(new / shards[-1]))
    metadata = {
        "fingerprint": FINGERPRINT,
        "resolution": RESOLUTION,
        "geometry": SquareGeometry("crop").key,
        "shape": [1, 1, 1],
        "scaling_factor": 1.0,
        "shards": shards,
    }
    write_index(new, {"version": CACHE_VERSION, **metadata}, paths)
    old = root / "old-index.json"
    location = {path: [i // SHARD_SIZE, i % SHARD_SIZE] for i, path in enumerate(paths)}
    old.write_text(json.dumps({"version": 2, **metadata, "images": location, "ids": ids}, ensure_ascii=False))
    return old, new.parent


def open_index(version: str, path: str, lookups: int) -> tuple[Any, float]:
    """The opened index of one version, and its time per lookup (µs) over `lookups` random images."""
    from dsvlm.data.geometry import SquareGeometry
    from dsvlm.data.latents import LatentCache

    rng = random.Random(1)
    if version == "old":
        index = json.loads(Path(path).read_text())
        table = index["images"]
        sample = rng.sample(list(table), lookups)
        start = time.perf_counter()
        for image in sample:
            table[image]  # the lookup is what is timed
        return index, (time.perf_counter() - start) / lookups * 1e6
    cache = LatentCache.open(path, FINGERPRINT, RESOLUTION, SquareGeometry("crop"))
    column = cache.images.column("image")
    sample = [column[i].as_py() for i in rng.sample(range(len(column)), lookups)]
    start = time.perf_counter()
    for image in sample:
        cache.locate(image)  # the index lookup; reading the latent from its shard is as before
    return cache, (time.perf_counter() - start) / lookups * 1e6


def child(job: dict[str, Any]) -> None:
    """Open one version in this fresh process; prints its JSON on the last stdout line."""
    # Warm up on a 100-image index first: imports, Arrow's kernels and allocator pools are per process, not per
    # image.
    open_index(job["version"], job["warm"], 50)
    with TreeMemory() as memory:
        held, lookup_us = open_index(job["version"], job["path"], job["lookups"])
        after = memory.sample()
        peak_anon = max(memory.peak["anon"], after["anon"])  # the sampler may not have seen the last state
    print(
        json.dumps(
            {
                "rss_held_mb": round(after["rss"] - memory.start["rss"], 1),
                "anon_held_mb": round(after["anon"] - memory.start["anon"], 1),
                "anon_peak_mb": round(peak_anon - memory.start["anon"], 1),
                "pickled_mb": round(len(pickle.dumps(held)) / 2**20, 3),
                "lookup_us": round(lookup_us, 2),
            }
        )
    )


def measure(version: str, paths: tuple[Path, Path], lookups: int) -> dict[str, Any]:
    warm, full = paths
    job = json.dumps({"version": version, "warm": str(warm), "path": str(full), "lookups": lookups})
    done = subprocess.run([sys.executable, __file__, "--child", job], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{version} index failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=624_000)
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--lookups", type=int, default=20_000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    report: dict[str, Any] = {"command": command_line(), "machine": machine(), "load_start": loadavg()}
    console = stderr_console()
    with tempfile.TemporaryDirectory() as tmp:
        warm_old, warm_new = write_caches(Path(tmp) / "warm", 100, 100)
        old, new = write_caches(Path(tmp) / "full", args.images, args.records)
        files = {
            "old index.json": old.stat().st_size,
            **{f"new {p.name}": p.stat().st_size for p in sorted((new / "latents").glob("[!s]*"))},  # not shards
        }
        report["file_mb"] = {name: round(size / 2**20, 2) for name, size in files.items()}
        console.print(f"{args.images} images, {args.records} ids: {report['file_mb']} MiB")
        report["old"] = measure("old", (warm_old, old), args.lookups)
        report["new"] = measure("new", (warm_new, new), args.lookups)
    report["load_end"] = loadavg()
    from rich.table import Table

    table = Table(title=f"latent index at {args.images} images (MiB over the process before opening)")
    for column in ("index", "RSS held", "anon held", "anon peak", "pickled", "µs / lookup"):
        table.add_column(column, justify="right")
    for name in ("old", "new"):
        row = report[name]
        table.add_row(
            "v2 JSON dict" if name == "old" else "v3 mapped Arrow",
            *(str(row[k]) for k in ("rss_held_mb", "anon_held_mb", "anon_peak_mb", "pickled_mb", "lookup_us")),
        )
    console.print(table)
    print(json.dumps(report, indent=2))
    write_report(args.json, report)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
