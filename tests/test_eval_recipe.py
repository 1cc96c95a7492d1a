"""`dsvlm eval` takes what the command line leaves open from a recipe's `eval:` section: `--recipe`'s, or the
training run's own; the flags win."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import tiny_vlm
from typer.testing import CliRunner

from dsvlm.cli.app import app
from dsvlm.data.synthetic import SyntheticConfig, prepare_synthetic
from dsvlm.outputs import RUN
from dsvlm.recipe import load_recipe
from dsvlm.recipe.load import read_yaml, recipe_path
from dsvlm.rundir import STAGE_INFO


def recipe_file(path: Path, **eval_section: object) -> Path:
    """tiny-synthetic with this `eval:` section, written to `path`."""
    data = read_yaml(recipe_path("tiny-synthetic"))
    data["eval"] = eval_section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_recipe_gives_what_the_flags_leave_open(tmp_path):
    """Benchmarks, limit, generation cap and the synthetic data from the recipe; the batch size from the flag."""
    model = tmp_path / "model"
    vlm, processor = tiny_vlm(load_recipe("tiny-synthetic").model, seed=0)
    vlm.save_pretrained(model)
    processor.save_pretrained(model)
    dataset = tmp_path / "synthetic"
    prepare_synthetic(dataset, SyntheticConfig(n_align=2, n_instruct=2, n_eval=6), progress=False)
    recipe = recipe_file(tmp_path / "recipe.yaml", benchmarks=["synthetic"], batch_size=3, limit=4, max_new_tokens=2)
    data = read_yaml(recipe)
    data["data"]["dataset"] = str(dataset)  # `synthetic` reads the recipe's prepared dataset
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "eval"

    result = CliRunner().invoke(
        app, ["eval", str(model), "--recipe", str(recipe), "--batch-size", "2", "--out", str(out), "--device", "cpu"]
    )

    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["benchmarks"]) == ["synthetic"]
    assert (summary["limit"], summary["max_new_tokens"], summary["batch_size"]) == (4, 2, 2)
    row = summary["benchmarks"]["synthetic"]
    assert row["n"] == 4 and row["data"] == str(dataset / "eval" / "synthetic.parquet")


@pytest.mark.parametrize("given", ["RUN", "RUN/align", "RUN/align/final", "RUN/align/stripped"])
def test_a_training_runs_own_recipe_gives_the_defaults(tmp_path, given):
    """A benchmark name only the run's recipe holds shows that it was read (the name is refused before any load)."""
    run = tmp_path / "run"
    recipe_file(run / "recipe.yaml", benchmarks=["only_in_the_run_recipe"])
    (run / RUN.marker).write_text("")
    recipe_file(run / "align" / "final" / "recipe.yaml", benchmarks=["only_in_the_run_recipe"])
    (run / "align" / "final" / STAGE_INFO).write_text("{}")
    (run / "align" / "stripped").mkdir()
    result = CliRunner().invoke(app, ["eval", str(tmp_path / given.replace("RUN", "run"))])
    assert result.exit_code == 2 and "unknown benchmark 'only_in_the_run_recipe'" in result.stderr


def test_a_recipe_in_a_folder_dsvlm_did_not_write_is_not_read(tmp_path):
    """Only a training run's recipe gives defaults: a folder that merely holds a recipe.yaml is no run."""
    recipe_file(tmp_path / "recipe.yaml", benchmarks=["only_in_the_run_recipe"])
    result = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2 and "no benchmark given" in result.stderr


def test_a_bench_flag_wins_over_the_recipe(tmp_path):
    recipe = recipe_file(tmp_path / "recipe.yaml", benchmarks=["synthetic"])
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--recipe", str(recipe), "--bench", "not_a_bench"])
    assert result.exit_code == 2 and "unknown benchmark 'not_a_bench'" in result.stderr


def test_without_a_recipe_the_benchmarks_must_be_given(tmp_path):
    result = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2 and "no benchmark given: pass --bench NAME, or --recipe" in result.stderr
    assert "Traceback" not in result.output
