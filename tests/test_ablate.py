"""`dsvlm ablate` on a tiny 2-arm x 2-seed grid: cells, resume, --cell, the report against the cells' own
samples files, the bootstrap, bad input; and `dsvlm probe` on one of its stripped models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import cli, prepare_small_synthetic, tiny_overrides

from dsvlm.ablate.grid import DONE, build_grid, cell_recipe, parse_arm, run_grid
from dsvlm.ablate.report import mmbench_item_hits, paired_bootstrap
from dsvlm.train.loop import TrainOptions, train

NO_SUPERVISION = "supervision.enabled=false,stages.0.train=[connector,vision,llm],stages.1.train=[connector,vision,llm]"
ARMS = ["--arm", "ds", "--arm", f"nosup={NO_SUPERVISION}"]


def grid_overrides(data: Path) -> list[str]:
    """Two steps per stage, a tiny probe; run.output_dir is the grid's business."""
    base = [o for o in tiny_overrides(data, data.parent / "unused", steps=2) if not o.startswith("run.output_dir")]
    return [
        *base,
        "run.checkpoint_every=1",
        "eval.limit=16",
        "ablate.probe_train=32",
        "ablate.probe_test=32",
        "ablate.probe_steps=5",
    ]


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory) -> dict:
    """One cell through `--cell` (CLI), one cell killed after its first stage, then the whole grid."""
    root = tmp_path_factory.mktemp("ablate")
    data = prepare_small_synthetic(root / "data", n=32)
    out = root / "grid"
    overrides = grid_overrides(data)
    grid = build_grid(
        "tiny-synthetic", overrides, [parse_arm("ds"), parse_arm(f"nosup={NO_SUPERVISION}")], seeds=[0, 1], out=out
    )

    single = cli(
        "ablate",
        "tiny-synthetic",
        *overrides,
        *ARMS,
        "--seeds",
        "0,1",
        "--out",
        out,
        "--cell",
        "ds:0",
        "--no-progress",
        check=True,
    )
    first_done = grid.cell_dir("ds", 0) / DONE
    cell_only = {
        "stdout": single.stdout.strip(),
        "cells": sorted(p.parent.name for p in out.glob("cells/*/*")),
        "report": (out / "report.json").exists(),
        "done_mtime": first_done.stat().st_mtime_ns,
    }

    # A cell killed after its first stage: the grid must keep that stage and train only the second.
    train(cell_recipe(grid, "nosup", 1), TrainOptions(stages=["align"], progress=False))
    align_info = grid.cell_dir("nosup", 1) / "run" / "align" / "final" / "stage.json"
    align_mtime = align_info.stat().st_mtime_ns

    report = run_grid(grid)
    return {
        "grid": grid,
        "report": report,
        "cell_only": cell_only,
        "first_done": first_done,
        "align_info": align_info,
        "align_mtime": align_mtime,
        "out": out,
        "overrides": overrides,
    }


@pytest.mark.slow  # the grid: four cells trained, stripped, evaluated and probed
def test_cell_runs_one_cell_only(grid_run):
    cell_only = grid_run["cell_only"]
    assert cell_only["stdout"] == str(grid_run["grid"].cell_dir("ds", 0))
    assert cell_only["cells"] == ["ds"] and not cell_only["report"]


@pytest.mark.slow
def test_grid_skips_finished_cells_and_resumes_killed_ones(grid_run):
    grid = grid_run["grid"]
    assert grid_run["first_done"].stat().st_mtime_ns == grid_run["cell_only"]["done_mtime"]
    assert grid_run["align_info"].stat().st_mtime_ns == grid_run["align_mtime"]
    instruct = json.loads((grid.cell_dir("nosup", 1) / "run" / "instruct" / "final" / "stage.json").read_text())
    assert instruct["init"] == str(grid_run["align_info"].parent)
    for arm, seed in grid.cells():
        cell = grid.cell_dir(arm, seed)
        assert (cell / DONE).is_file() and (cell / "model" / "config.json").is_file()
        assert (cell / "probe" / "probe.png").is_file()
        recipe = cell_recipe(grid, arm, seed)
        assert recipe.run.seed == seed and recipe.ablate is None
        assert recipe.supervision.enabled == (arm == "ds")
    again = cli(
        "ablate",
        "tiny-synthetic",
        *grid_run["overrides"],
        *ARMS,
        "--seeds",
        "0,1",
        "--out",
        grid_run["out"],
        "--report-only",
        "--json",
        check=True,
    )
    assert json.loads(again.stdout) == grid_run["report"]


def samples_hits(cell: Path) -> dict[int, tuple[str, float]]:
    """Recompute a cell's item hits from its samples file, independently of the report's reader."""
    summary = json.loads((cell / "eval" / "summary.json").read_text())["benchmarks"]["synthetic"]
    records = [json.loads(line)["gpt_eval_score"] for line in Path(summary["samples"]).read_text().splitlines()]
    hits = mmbench_item_hits(records)
    assert 100 * np.mean([hit for _, hit in hits.values()]) == pytest.approx(summary["score"])
    return hits


@pytest.mark.slow
def test_report_numbers_match_the_cells_samples(grid_run):
    grid, report = grid_run["grid"], grid_run["report"]
    out = grid_run["out"]
    assert {p.name for p in out.glob("report.*")} == {"report.json", "report.md", "report.png"}
    assert json.loads((out / "report.json").read_text()) == report
    hits = {(a, s): samples_hits(grid.cell_dir(a, s)) for a, s in grid.cells()}
    assert all(len(h) == 16 for h in hits.values())
    categories = {c for h in hits.values() for c, _ in h.values()}
    for arm in ("ds", "nosup"):
        for category in ["all", *categories]:
            per_seed = [
                100 * np.mean([hit for c, hit in hits[arm, s].values() if category in ("all", c)]) for s in (0, 1)
            ]
            row = report["accuracy"][arm]["synthetic"][category]
            assert row["mean"] == pytest.approx(np.mean(per_seed), abs=1e-3)
            assert row["std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-3)
    paired = report["paired"]["nosup"]["synthetic"]["all"]
    deltas = [100 * np.mean([hits["nosup", s][i][1] - hits["ds", s][i][1] for i in hits["ds", s]]) for s in (0, 1)]
    assert paired["delta"] == pytest.approx(np.mean(deltas), abs=1e-3)
    assert paired["ci95"][0] <= paired["delta"] <= paired["ci95"][1] and paired["n_items"] == 16
    assert "ds" not in report["paired"]  # the baseline: the first arm
    assert set(report["probe"]) == {"ds", "nosup"} and report["collapse"]["ds"]["flag"] is False
    assert report["collapse"]["nosup"]["rec_loss_drop"] is None  # no reconstruction loss without supervision
    markdown = (out / "report.md").read_text()
    assert "Paired difference to `ds`" in markdown and "| nosup |" in markdown


@pytest.mark.slow
def test_probe_command_writes_its_files(grid_run, tmp_path):
    model = grid_run["grid"].cell_dir("ds", 0) / "model"
    result = cli(
        "probe",
        model,
        "--out",
        tmp_path,
        "--n-train",
        "32",
        "--n-test",
        "16",
        "--steps",
        "5",
        "--no-per-patch",
        "--json",
        check=True,
    )
    probe = json.loads(result.stdout)
    assert {p.name for p in tmp_path.iterdir()} == {"probe.json", "probe.md", "probe.png"}
    assert list(probe["accuracy"]) == [*(f"layer {i}/mean" for i in range(5)), "connector/mean"]
    assert set(probe["chance"]) == {"colour", "shape", "position", "size", "count"}


def test_bootstrap_interval_of_identical_arms_contains_zero():
    rng = np.random.default_rng(0)
    hits = rng.integers(0, 2, size=(3, 200)).astype(float)
    # Every item 0.25 better under every seed: each resample's mean is 0.25 (seed and item weights sum to 1).
    assert paired_bootstrap(np.full((3, 200), 0.25), 500) == pytest.approx((0.25, 0.25))
    # Two arms of the same skill but their own draws: the interval is wide and contains 0.
    other = rng.integers(0, 2, size=(3, 200)).astype(float)
    low, high = paired_bootstrap(other - hits, 2000)
    assert low < 0 < high and high - low > 1e-3
    # A real difference is found.
    low, high = paired_bootstrap(np.maximum(hits, rng.integers(0, 2, size=(3, 200))) - hits, 2000)
    assert low > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arm", "a", "--arm", "a=supervision.weight=0.5"], "arm name used twice: a"),
        (["--arm", "a", "--arm", "bad=supervision.weight=-1"], "arm 'bad'"),
        (["--arm", "a", "--arm", "b=stages.0.lr=fast"], "arm 'b'"),
        (["--arm", "a", "--seeds", ","], "seed list is empty"),
        (["--arm", "a", "--cell", "zz:0"], "no arm 'zz'"),
    ],
)
def test_bad_grids_exit_2_with_a_clear_message(args, message, tmp_path):
    result = cli("ablate", "tiny-synthetic", f"data.dataset={tmp_path}", "--out", tmp_path / "g", *args)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "g").exists()
