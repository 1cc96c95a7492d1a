"""Every benchmark of the paper, plus MMVP and CV-Bench, through `dsvlm eval` offline: a tiny local parquet
per benchmark in the schema its lmms-eval 0.7.3 task reads (tests/bench_fixtures.py), dsvlm's class, the
task's own scoring; the summary's score equals a re-aggregation of the samples file with the task's own
aggregation function. Judge-scored benchmarks fail fast without a judge, naming it and how to set one."""

from __future__ import annotations

import importlib
import inspect
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from bench_fixtures import ROWS, write_fixture
from helpers import cli

from dsvlm.errors import DsvlmError
from dsvlm.evaluation import BENCHMARKS, evaluate
from dsvlm.evaluation.benches import Benchmark, get_benchmark
from dsvlm.evaluation.compat import lmms_cli_args

JUDGED = ["mathvista", "hallusionbench", "llava_bench"]
OFFLINE = [name for name in ROWS if name not in JUDGED]
N_ITEMS = 4


def test_the_fixtures_cover_the_twelve_benchmarks():
    assert set(ROWS) == set(BENCHMARKS) - {"synthetic"}
    assert len(ROWS) == 12 and {"mmvp", "cv_bench"} <= set(ROWS)
    assert {name for name in ROWS if get_benchmark(name).judge} == set(JUDGED)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bench-fixtures")
    return {name: write_fixture(name, folder, N_ITEMS) for name in ROWS}


@pytest.fixture(scope="module")
def summary(trained_tiny_model, fixtures, tmp_path_factory) -> dict[str, Any]:
    """One `dsvlm eval` of the nine judge-free benchmarks, as a user runs it."""
    out = tmp_path_factory.mktemp("eval-benches")
    data = [arg for name in OFFLINE for arg in ("--data-files", f"{name}={fixtures[name]}")]
    result = cli(
        "eval",
        trained_tiny_model,
        "--bench",
        ",".join(OFFLINE),
        *data,
        "--out",
        out,
        "--max-new-tokens",
        "8",
        "--json",
        check=True,
    )
    return json.loads(result.stdout)


@pytest.mark.slow  # one `dsvlm eval` of nine benchmarks (~15 s) on the shared trained tiny model
@pytest.mark.parametrize("name", OFFLINE)
def test_benchmark_scores_offline_and_the_samples_give_the_score(name, summary, fixtures, tmp_path):
    row = summary["benchmarks"][name]
    bench = get_benchmark(name)
    assert row["lmms_eval_task"] == bench.task and row["data"] == str(fixtures[name])
    assert row["n"] == N_ITEMS and row["metric"].split(",")[0] == bench.metric
    assert isinstance(row["score"], float)
    samples = [json.loads(line) for line in Path(row["samples"]).read_text().splitlines()]
    assert len(samples) == N_ITEMS
    assert all(isinstance(s["filtered_resps"][0], str) for s in samples)  # dsvlm's class answered each item
    aggregate = aggregation(bench)
    values = [sample[bench.metric] for sample in samples]
    arguments = (values, lmms_cli_args(tmp_path)) if len(inspect.signature(aggregate).parameters) > 1 else (values,)
    assert aggregate(*arguments) == pytest.approx(row["score"])


def aggregation(bench: Benchmark) -> Callable[..., float]:
    """The aggregation function the benchmark's task YAML names for its headline metric."""
    metrics = bench.overrides.get("metric_list") or raw_task_yaml(bench.yaml_path)["metric_list"]
    entry = next(m for m in metrics if m["metric"] == bench.metric)
    name = str(entry["aggregation"])
    if name == "mean":
        return lambda values: statistics.fmean(values)
    module, _, function = name.rpartition(".")
    if not module.startswith("lmms_eval."):  # relative to the task's folder
        module = f"lmms_eval.tasks.{bench.yaml_path.parent.name}.{module}"
    return getattr(importlib.import_module(module), function)


class _RawLoader(yaml.SafeLoader):
    """Keeps `!function` references as their dotted names."""


_RawLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def raw_task_yaml(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=_RawLoader) or {}
    includes = data.pop("include", [])
    merged: dict[str, Any] = {}
    for include in reversed([includes] if isinstance(includes, str) else includes):
        merged.update(raw_task_yaml(path.parent / include))
    return {**merged, **data}


@pytest.mark.parametrize("name", JUDGED)
def test_judged_benchmark_fails_fast_naming_the_judge(name, fixtures, model_shaped_dir, tmp_path, monkeypatch):
    for module in get_benchmark(name).requires:
        pytest.importorskip(module, reason=f"{name}'s task needs it (see the missing-package test)")
    for var in ("OPENAI_API_KEY", "OPENAI_API_URL", "API_TYPE", "AZURE_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    data = {name: str(fixtures[name])}
    with pytest.raises(DsvlmError) as error:
        evaluate(model_shaped_dir, [name], tmp_path / "out", data_files=data)
    message = str(error.value)
    assert f"'{name}'" in message and get_benchmark(name).task in message and "LLM judge" in message
    assert "OPENAI_API_KEY is not set" in message and "OPENAI_API_URL" in message and "AZURE_API_KEY" in message

    # Configured but unreachable: one connection attempt, no retries.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_API_URL", "http://127.0.0.1:9/v1")
    with pytest.raises(DsvlmError, match=r"the judge at http://127.0.0.1:9/v1 cannot be reached"):
        evaluate(model_shaped_dir, [name], tmp_path / "out", data_files=data)


def test_a_task_package_that_is_missing_fails_fast_with_the_pip_command(fixtures, model_shaped_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("Levenshtein") is not None:
        pytest.skip("Levenshtein is installed: mathvista's task can import it")
    with pytest.raises(DsvlmError, match="imports Levenshtein, which is not installed; run: pip install levenshtein"):
        evaluate(model_shaped_dir, ["mathvista"], tmp_path, data_files={"mathvista": str(fixtures["mathvista"])})


def test_judge_error_is_one_clean_line_from_the_cli(fixtures, model_shaped_dir):
    result = cli(
        "eval",
        model_shaped_dir,
        "--bench",
        "llava_bench",
        "--data-files",
        f"llava_bench={fixtures['llava_bench']}",
        env={"OPENAI_API_KEY": ""},
    )
    assert result.exit_code == 2 and "Traceback" not in result.output and not result.stdout
    assert "needs an LLM judge" in " ".join(result.stderr.split())


@pytest.mark.parametrize("name", JUDGED)
def test_judged_benchmark_fixtures_are_read_by_their_task(name, fixtures, tmp_path):
    """What can run without a judge: lmms-eval builds the task on the fixture and renders every item's
    prompt and images with the task's own functions."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    from dsvlm.evaluation.benches import write_task_yaml

    for module in get_benchmark(name).requires:
        pytest.importorskip(module, reason=f"{name}'s task needs it (see the missing-package test)")
    task_name = write_task_yaml(get_benchmark(name), tmp_path, fixtures[name])
    task = get_task_dict([task_name], TaskManager("WARNING", include_path=str(tmp_path), include_defaults=False))[
        task_name
    ]
    docs = list(task.test_docs())
    assert len(docs) == N_ITEMS
    for doc in docs:
        assert isinstance(task.doc_to_text(doc), str) and task.doc_to_text(doc)
        assert len(task.doc_to_visual(doc)) == 1
