"""The report of an ablation grid, computed from the finished cells' own files.

- accuracy: per arm, benchmark and item category, mean ± std over seeds (percent);
- paired: per arm, the difference to the baseline arm on the same items with the same seed, its mean over
  seeds and a 95 % bootstrap interval that resamples evaluation items and seeds (both paired);
- probe: per arm, the probe accuracies averaged over seeds;
- collapse: an arm whose reconstruction loss fell by more than COLLAPSE_DROP from its first logged value
  while its mean probe accuracy did not rise above the baseline's.

Item correctness is read from lmms-eval's samples files. MMBench-schema tasks (mmbench, synthetic) are
re-scored item by item with lmms-eval's own MMBench evaluator (static letter matching, circular variants
grouped), so the item hits average exactly to the benchmark's score. Other benchmarks contribute their
summary score per seed (category `all`, intervals over seeds only).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from dsvlm.ablate.grid import Grid, cell_recipe, is_done
from dsvlm.errors import DsvlmError
from dsvlm.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
ALL = "all"
COLLAPSE_DROP = 0.5  # a reconstruction loss that ends below half its first value "fell steeply"
CIRCULAR = 1_000_000  # MMBench: index + k * 1e6 are circular variants of item `index`

Hits = dict[str, dict[Any, tuple[str, float]]]  # benchmark -> item id -> (category, hit 0/1)


def mmbench_item_hits(records: list[dict[str, Any]]) -> dict[Any, tuple[str, float]]:
    """Item index -> (category, hit) as lmms-eval's MMBench_Evaluator.eval_result(static) scores them."""
    import pandas as pd
    from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator

    data = pd.DataFrame(records).sort_values(by="index")
    data["prediction"] = [str(x) for x in data["prediction"]]
    data.columns = [k.lower() if k not in "ABCD" else k for k in data.columns]  # eval_result's own renaming
    answers = dict(zip(data["index"], data["answer"], strict=True))
    evaluator = MMBench_Evaluator()
    hits = {}
    for index, category in zip(data["index"], data["category"], strict=True):
        if index < CIRCULAR:
            variants = data[data["index"] % CIRCULAR == index]
            hits[int(index)] = (str(category), float(evaluator.eval_sub_data(variants, answers, static_only=True)))
    return hits


def read_cell_hits(eval_dir: Path) -> tuple[dict[str, float | None], Hits]:
    """A cell's summary score per benchmark, and its item hits where the samples allow."""
    from dsvlm.evaluation.runner import load_summary

    summary = load_summary(eval_dir)
    scores, hits = {}, {}
    for bench, row in summary["benchmarks"].items():
        scores[bench] = row["score"]
        samples = Path(row["samples"])
        if not samples.is_absolute() or not samples.is_file():
            samples = eval_dir / samples.name  # a moved grid: the file sits next to summary.json
        records = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
        scored = [r["gpt_eval_score"] for r in records if isinstance(r.get("gpt_eval_score"), dict)]
        if scored and len(scored) == len(records):
            hits[bench] = mmbench_item_hits(scored)
    return scores, hits


def paired_bootstrap(diffs: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean of `diffs` (seeds x items), resampling seeds and items with replacement;
    one item draw is shared by all seeds (the same items were scored under every seed)."""
    n_seeds, n_items = diffs.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    chunk = max(1, 2_000_000 // max(n_items, 1))  # bounds the memory of the item weights
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        item_weights = rng.multinomial(n_items, np.full(n_items, 1 / n_items), size=size) / n_items
        seed_weights = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=size) / n_seeds
        stats[start : start + size] = ((item_weights @ diffs.T) * seed_weights).sum(1)
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


def _per_category(hits: dict[Any, tuple[str, float]]) -> dict[str, dict[Any, float]]:
    """category -> item -> hit, with the `all` category holding every item."""
    out: dict[str, dict[Any, float]] = {ALL: {}}
    for item, (category, hit) in sorted(hits.items()):
        out[ALL][item] = hit
        out.setdefault(category, {})[item] = hit
    return out


def _cell_items(scores: dict[str, float | None], hits: Hits, bench: str) -> dict[str, dict[Any, float]] | None:
    """category -> item -> value for one benchmark of a cell; without item hits, one pseudo-item: the score."""
    if bench in hits:
        return _per_category(hits[bench])
    score = scores.get(bench)
    return None if score is None else {ALL: {"score": score / 100}}


def _stats(values: list[float]) -> dict[str, float]:
    array = np.array(values)
    return {
        "mean": round(float(array.mean()), 4),
        "std": round(float(array.std(ddof=1)) if len(array) > 1 else 0.0, 4),
        "n_seeds": len(values),
    }


def _rec_losses(grid: Grid, arm: str, seed: int) -> list[float]:
    """The cell's logged reconstruction losses, stage after stage."""
    run = grid.cell_dir(arm, seed) / "run"
    values = []
    for stage in cell_recipe(grid, arm, seed).stages:
        path = run / stage.name / "metrics.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                value = json.loads(line).get("rec_loss")
                if value is not None:
                    values.append(float(value))
    return values


def build_report(grid: Grid) -> dict[str, Any]:
    """Read every finished cell, write OUT/report.{json,md,png}; return the report."""
    from dsvlm.analysis.probe import PROBE_JSON, mean_accuracy

    done = [(arm, seed) for arm, seed in grid.cells() if is_done(grid, arm, seed)]
    missing = [f"{arm}:{seed}" for arm, seed in grid.cells() if (arm, seed) not in done]
    if not done:
        raise DsvlmError(f"no finished cell in {grid.out / 'cells'}: run the grid (or some --cell) first")
    if missing:
        log.warning("%d cell(s) not finished, left out of the report: %s", len(missing), ", ".join(missing))

    items: dict[tuple[str, int], dict[str, dict[str, dict[Any, float]]]] = {}
    probes: dict[tuple[str, int], dict[str, Any]] = {}
    for arm, seed in done:
        cell = grid.cell_dir(arm, seed)
        scores, hits = read_cell_hits(cell / "eval")
        items[arm, seed] = {b: c for b in grid.benchmarks if (c := _cell_items(scores, hits, b)) is not None}
        if (cell / "probe" / PROBE_JSON).is_file():
            probes[arm, seed] = json.loads((cell / "probe" / PROBE_JSON).read_text())

    arms = [arm.name for arm in grid.arms]
    accuracy: dict[str, Any] = {}
    for arm in arms:
        accuracy[arm] = {}
        for bench in grid.benchmarks:
            per_category: dict[str, dict[int, float]] = {}
            for seed in grid.seeds:
                for category, values in items.get((arm, seed), {}).get(bench, {}).items():
                    per_category.setdefault(category, {})[seed] = 100 * float(np.mean(list(values.values())))
            accuracy[arm][bench] = {c: {**_stats(list(v.values())), "per_seed": v} for c, v in per_category.items()}

    paired: dict[str, Any] = {}
    for arm in arms:
        if arm == grid.baseline:
            continue
        paired[arm] = {}
        for bench in grid.benchmarks:
            paired[arm][bench] = {}
            seeds = [
                s for s in grid.seeds if bench in items.get((arm, s), {}) and bench in items.get((grid.baseline, s), {})
            ]
            if not seeds:
                continue
            categories = set.intersection(*(set(items[a, s][bench]) for s in seeds for a in (arm, grid.baseline)))
            for category in sorted(categories, key=lambda c: (c != ALL, c)):
                common = set.intersection(
                    *(set(items[a, s][bench][category]) for s in seeds for a in (arm, grid.baseline))
                )
                ids = sorted(common, key=str)
                diffs = (
                    np.array(
                        [
                            [
                                items[arm, s][bench][category][i] - items[grid.baseline, s][bench][category][i]
                                for i in ids
                            ]
                            for s in seeds
                        ]
                    )
                    * 100
                )
                low, high = paired_bootstrap(diffs, grid.config.bootstrap)
                paired[arm][bench][category] = {
                    "delta": round(float(diffs.mean()), 4),
                    "ci95": [round(low, 4), round(high, 4)],
                    "per_seed": {s: round(float(d), 4) for s, d in zip(seeds, diffs.mean(1), strict=True)},
                    "n_items": len(ids),
                    "seeds": seeds,
                }

    probe_summary: dict[str, Any] = {}
    for arm in arms:
        results = [probes[arm, s] for s in grid.seeds if (arm, s) in probes]
        if results:
            first = results[0]
            probe_summary[arm] = {
                "mean": round(float(np.mean([mean_accuracy(r) for r in results])), 4),
                "accuracy": {
                    f: {
                        a: round(float(np.mean([r["accuracy"][f][a] for r in results])), 4) for a in first["attributes"]
                    }
                    for f in first["accuracy"]
                },
                "chance": first["chance"],
                "attributes": first["attributes"],
                "n_seeds": len(results),
            }

    collapse: dict[str, Any] = {}
    base_probe = probe_summary.get(grid.baseline, {}).get("mean")
    for arm in arms:
        drops = []
        for seed in grid.seeds:
            losses = _rec_losses(grid, arm, seed) if (arm, seed) in done else []
            if losses and losses[0] > 0:
                drops.append(1 - losses[-1] / losses[0])
        drop = float(np.mean(drops)) if drops else None
        arm_probe = probe_summary.get(arm, {}).get("mean")
        flag = bool(
            drop is not None
            and drop > COLLAPSE_DROP
            and arm_probe is not None
            and base_probe is not None
            and arm != grid.baseline
            and arm_probe <= base_probe
        )
        collapse[arm] = {
            "rec_loss_drop": None if drop is None else round(drop, 4),
            "probe_mean": arm_probe,
            "baseline_probe_mean": base_probe,
            "flag": flag,
        }

    report = {
        "grid": {
            "recipe": grid.recipe,
            "overrides": list(grid.overrides),
            "arms": {a.name: list(a.overrides) for a in grid.arms},
            "baseline": grid.baseline,
            "seeds": list(grid.seeds),
            "benchmarks": list(grid.benchmarks),
            "out": str(grid.out),
        },
        "cells": {f"{a}:{s}": str(grid.cell_dir(a, s)) for a, s in done},
        "missing": missing,
        "accuracy": accuracy,
        "paired": paired,
        "probe": probe_summary,
        "collapse": collapse,
    }
    report = json.loads(json.dumps(report))  # seed keys become strings now, as in the file
    grid.out.mkdir(parents=True, exist_ok=True)
    bar_chart(report, grid.out / REPORT_PNG)
    atomic_write_text(grid.out / REPORT_MD, markdown(report))
    atomic_write_json(grid.out / REPORT_JSON, report)
    return report


def _columns(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(benchmark, category) pairs in a stable order: `all` first within each benchmark."""
    columns: dict[tuple[str, str], None] = {}
    for arm_rows in report["accuracy"].values():
        for bench, categories in arm_rows.items():
            for category in sorted(categories, key=lambda c: (c != ALL, c)):
                columns[bench, category] = None
    return sorted(columns, key=lambda bc: (report["grid"]["benchmarks"].index(bc[0]), bc[1] != ALL, bc[1]))


def markdown(report: dict[str, Any]) -> str:
    grid = report["grid"]
    columns = _columns(report)
    header = "| arm | " + " | ".join(f"{b}/{c}" for b, c in columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    lines = [
        f"# Ablation: {grid['recipe']}",
        "",
        f"Baseline `{grid['baseline']}`; seeds {', '.join(map(str, grid['seeds']))}; cells in `{grid['out']}/cells`.",
        "",
    ]
    if report["missing"]:
        lines += [f"Not finished (left out): {', '.join(report['missing'])}", ""]
    lines += ["## Accuracy (%), mean ± std over seeds", "", header, rule]
    for arm, rows in report["accuracy"].items():
        cells = [rows.get(b, {}).get(c) for b, c in columns]
        lines.append(
            f"| {arm} | "
            + " | ".join("-" if s is None else f"{s['mean']:.2f} ± {s['std']:.2f} (n={s['n_seeds']})" for s in cells)
            + " |"
        )
    lines += [
        "",
        f"## Paired difference to `{grid['baseline']}` (points), 95 % bootstrap interval over items and seeds",
        "",
        header,
        rule,
    ]
    for arm, rows in report["paired"].items():
        cells = [rows.get(b, {}).get(c) for b, c in columns]
        lines.append(
            f"| {arm} | "
            + " | ".join(
                "-" if d is None else f"{d['delta']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" for d in cells
            )
            + " |"
        )
    if report["probe"]:
        attributes = next(iter(report["probe"].values()))["attributes"]
        lines += [
            "",
            "## Linear probes (held-out accuracy, mean over features and seeds)",
            "",
            "| arm | " + " | ".join(attributes) + " | mean | rec-loss drop | collapse |",
            "|---" * (len(attributes) + 4) + "|",
        ]
        for arm, probe in report["probe"].items():
            per_attribute = [np.mean([row[a] for row in probe["accuracy"].values()]) for a in attributes]
            flag = report["collapse"][arm]
            drop = "-" if flag["rec_loss_drop"] is None else f"{100 * flag['rec_loss_drop']:.0f} %"
            lines.append(
                f"| {arm} | "
                + " | ".join(f"{v:.3f}" for v in per_attribute)
                + f" | {probe['mean']:.3f} | {drop} | {'**yes**' if flag['flag'] else 'no'} |"
            )
        chance = next(iter(report["probe"].values()))["chance"]
        lines.append("| chance | " + " | ".join(f"{chance[a]:.3f}" for a in attributes) + " | | | |")
    return "\n".join(lines) + "\n"


def bar_chart(report: dict[str, Any], out: Path) -> None:
    """Accuracy per (benchmark, category), one bar per arm, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _columns(report)
    arms = list(report["accuracy"])
    width = 0.8 / max(len(arms), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(columns) * max(1, len(arms)) * 0.5 + 2), 4))
    for i, arm in enumerate(arms):
        stats = [report["accuracy"][arm].get(b, {}).get(c) for b, c in columns]
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(columns))]
        ax.bar(
            xs,
            [s["mean"] if s else 0 for s in stats],
            width,
            yerr=[s["std"] if s else 0 for s in stats],
            capsize=3,
            label=arm,
        )
    ax.set_xticks(range(len(columns)), [f"{b}\n{c}" for b, c in columns], fontsize=8)
    ax.set_ylabel("accuracy (%), mean ± std over seeds")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(f"{report['grid']['recipe']}: baseline {report['grid']['baseline']}", fontsize=9)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
