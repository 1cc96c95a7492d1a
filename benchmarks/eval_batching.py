"""Batch invariance and speed-up of dsvlm's lmms-eval class: greedy answers at batch 1/4/8/16 compared with
batch 1 of the same dtype, and the model time of each, in fp32 and bf16.

    .venv/bin/python benchmarks/eval_batching.py [--model DIR] [--device cpu|cuda] [--dtypes float32,bfloat16] \
        [--batch-sizes 1,4,8,16] [--n-images 240] [--n-text 60] [--repeats 1] [--json FILE]

Without `--model` it trains the tests' tiny LLaVA a little first (tests/tiny_llava.py, about 30 s on CPU). The
items are the batch-invariance test's: synthetic questions of every type with a 0-12 word hint (mixed prompt
lengths) and text-only copies. `model s` times the class's `generate_until` (best of `--repeats`);
`agreement` is the share of answers equal to batch 1's in the same dtype; `max |dlogit|` compares the first
generated token's logits with batch 1's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _common  # sets environment defaults before torch loads
import torch
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny model and items
from tiny_llava import mixed_requests, train_tiny_llava

from dsvlm.evaluation.lmms_model import DsvlmLlava


def run(model: Path, requests: list, task_dict: dict, batch_size: int, device: str, dtype: str) -> dict:
    """Answers, first-token logits (in request order) and model seconds of one `generate_until` pass."""
    lm = DsvlmLlava(pretrained=str(model), batch_size=batch_size, device=device, dtype=dtype)
    lm.task_dict = task_dict
    generate = lm.model.generate
    first: list[torch.Tensor] = []

    def recording_generate(**kwargs):
        out = generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        first.append(out.logits[0].float().cpu())
        return out.sequences

    lm.model.generate = recording_generate
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    answers = lm.generate_until(requests)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    logits = torch.empty(len(requests), first[0].shape[-1])
    for batch, rows in zip(lm._batches(requests, group=lambda args: ""), first, strict=True):
        logits[batch] = rows
    return {"answers": answers, "logits": logits, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="A stripped model (default: train a tiny one).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--n-images", type=int, default=240)
    parser.add_argument("--n-text", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=1, help="Timed passes per configuration (best kept).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if batch_sizes[0] != 1:
        batch_sizes.insert(0, 1)  # the reference

    rows = []
    with tempfile.TemporaryDirectory(prefix="dsvlm-eval-batching-") as tmp:
        model = args.model or train_tiny_llava(Path(tmp) / "model")
        requests, task_dict = mixed_requests(Path(tmp) / "items", args.n_images, args.n_text)
        run(model, requests[:16], task_dict, 8, args.device, "float32")  # warm-up
        for dtype in args.dtypes.split(","):
            reference = None
            for batch_size in batch_sizes:
                passes = [run(model, requests, task_dict, batch_size, args.device, dtype) for _ in range(args.repeats)]
                best = min(passes, key=lambda p: p["seconds"])
                reference = reference or best
                same = sum(a == b for a, b in zip(best["answers"], reference["answers"], strict=True))
                rows.append(
                    {
                        "dtype": dtype,
                        "batch_size": batch_size,
                        "n": len(requests),
                        "model_s": round(best["seconds"], 3),
                        "speedup_vs_batch_1": round(reference["seconds"] / best["seconds"], 2),
                        "agreement_vs_batch_1": round(same / len(requests), 4),
                        "max_abs_first_logit_diff": float((best["logits"] - reference["logits"]).abs().max()),
                    }
                )
    table = Table(
        "dtype",
        "batch",
        "n",
        "model s",
        "speed-up",
        "agreement",
        "max |dlogit|",
        title=f"dsvlm class batch invariance ({args.device})",
    )
    for row in rows:
        table.add_row(
            row["dtype"],
            str(row["batch_size"]),
            str(row["n"]),
            f"{row['model_s']:.2f}",
            f"{row['speedup_vs_batch_1']:.2f}x",
            f"{row['agreement_vs_batch_1']:.2%}",
            f"{row['max_abs_first_logit_diff']:.1e}",
        )
    _common.stderr_console().print(table)
    report = {"device": args.device, "command": _common.command_line(), "machine": _common.machine(), "runs": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
