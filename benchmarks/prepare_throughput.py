"""`dsvlm prepare llava` throughput: records/s at --workers 1 and 2 on a synthetic LLaVA-format input.

    .venv/bin/python benchmarks/prepare_throughput.py [--n-records 10000] [--workers 1,2] [--repeats 3] \
        [--json FILE]

The input is the synthetic set's caption split (`--n-records` records, one 32x32 PNG each, plus one instruct
record), written by `dsvlm prepare synthetic`; its `align.json`, `instruct.json` and `images/` are then prepared
again as plain LLaVA data. Each worker count is timed two ways, round-robin (ABBA), median of `--repeats`:
- `cli`: the command `python -m dsvlm prepare llava ... --workers N --overwrite` end to end (interpreter start,
  imports, validation, image checks, parquet writing);
- `in-process`: the same work through `dsvlm.data.llava.prepare_llava` in this process (no start-up cost).
The images were just written, so they are in the page cache: this measures CPU cost, not disk reads.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    command_line,
    dsvlm,
    loadavg,
    machine,
    median,
    prepare_synthetic,
    round_robin,
    stderr_console,
    write_report,
)
from rich.table import Table

from dsvlm.data.llava import prepare_llava

MODES = ("cli", "in-process")


def prepare_once(mode: str, raw: Path, out: Path, workers: int) -> float:
    """Seconds to prepare `raw` into `out` (replaced) with `workers` processes."""
    splits = {"align": raw / "align.json", "instruct": raw / "instruct.json"}
    start = time.perf_counter()
    if mode == "cli":
        dsvlm(
            "prepare",
            "llava",
            str(out),
            "--align",
            str(splits["align"]),
            "--instruct",
            str(splits["instruct"]),
            "--image-root",
            str(raw / "images"),
            "--workers",
            str(workers),
            "--overwrite",
        )
    else:
        prepare_llava(out, splits, raw / "images", workers=workers, overwrite=True, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-records", type=int, default=10_000, help="Caption records (one image each).")
    parser.add_argument("--workers", default="1,2", help="Comma-separated --workers values.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per configuration.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    console = stderr_console()
    report: dict[str, Any] = {"command": command_line(), "machine": machine(), "load_start": loadavg()}

    configs = [(mode, w) for w in workers for mode in MODES]
    times: dict[tuple[str, int], list[float]] = {config: [] for config in configs}
    with tempfile.TemporaryDirectory(prefix="dsvlm-prepare-bench-") as tmp:
        start = time.perf_counter()
        raw = prepare_synthetic(Path(tmp) / "raw", n_align=args.n_records, n_instruct=1, n_eval=1)
        report["input_generation_s"] = round(time.perf_counter() - start, 2)
        out = Path(tmp) / "out"
        for r in range(args.repeats):
            for mode, w in round_robin(configs, r):
                times[mode, w].append(prepare_once(mode, raw, out, w))
        manifest = json.loads((out / "manifest.json").read_text())
    records = sum(split["records"] + sum(split["skipped"].values()) for split in manifest["splits"].values())

    rows = []
    for mode, w in configs:
        seconds = median(times[mode, w])
        rows.append(
            {
                "mode": mode,
                "workers": w,
                "records": records,
                "seconds_median": round(seconds, 3),
                "seconds_all": [round(t, 3) for t in times[mode, w]],
                "records_per_s": round(records / seconds, 1),
            }
        )
    for row in rows:
        single = next(r for r in rows if r["mode"] == row["mode"] and r["workers"] == workers[0])
        row["speedup_vs_first_workers"] = round(single["seconds_median"] / row["seconds_median"], 3)
    report.update(n_records=records, runs=rows, load_end=loadavg())

    table = Table(
        "mode",
        "workers",
        "records",
        "s (median)",
        "all runs s",
        "records/s",
        f"x workers={workers[0]}",
        title=f"dsvlm prepare llava: {records:,} records, {args.repeats} runs each",
    )
    for row in rows:
        table.add_row(
            row["mode"],
            str(row["workers"]),
            f"{row['records']:,}",
            f"{row['seconds_median']:.2f}",
            " ".join(f"{t:.2f}" for t in row["seconds_all"]),
            f"{row['records_per_s']:,.0f}",
            f"{row['speedup_vs_first_workers']:.2f}",
        )
    console.print(table)
    console.print(f"load average: start {report['load_start']}, end {report['load_end']}")
    write_report(args.json, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
