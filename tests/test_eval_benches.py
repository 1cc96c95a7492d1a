"""`dsvlm eval` without a real model: the benchmark registry against lmms-eval 0.7.3, generated task YAMLs,
bad input, the offline fail-fast, `compare`, the entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import cli

from dsvlm.errors import DsvlmError
from dsvlm.evaluation import BENCHMARKS, compare, evaluate, resolve_model
from dsvlm.evaluation.benches import get_benchmark, parse_benches, parse_data_files, write_task_yaml
from dsvlm.evaluation.model_dir import resolve_device
from dsvlm.evaluation.runner import compare_table, default_out_dir

PAPER_BENCHES = {
    "mmbench",
    "mmstar",
    "mmmu",
    "mathvista",
    "ocrbench",
    "ai2d",
    "hallusionbench",
    "llava_bench",
    "scienceqa",
    "mme",
}


def flat(text: str) -> str:
    """The CLI's rich console wraps long messages; compare with whitespace collapsed."""
    return " ".join(text.split())


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_names_a_real_lmms_eval_task(name):
    bench = BENCHMARKS[name]
    config = bench.task_config()
    assert config["task"] == bench.task
    metrics = [m["metric"] for m in bench.overrides.get("metric_list", config["metric_list"])]
    assert bench.metric in metrics
    assert config["test_split"]
    if bench.hub:
        assert "/" in config["dataset_path"]


def test_the_paper_benchmarks_and_synthetic_are_registered():
    assert set(BENCHMARKS) == PAPER_BENCHES | {"mmvp", "cv_bench", "synthetic"}
    assert BENCHMARKS["mmbench"].task == "mmbench_en_dev_static"  # regex letter extraction, no OpenAI judge
    assert not BENCHMARKS["synthetic"].hub


def test_generated_task_yaml_is_indexed_by_lmms_eval_under_its_own_name(tmp_path):
    from lmms_eval.tasks import TaskManager

    data = tmp_path / "mmstar.parquet"
    data.write_bytes(b"")
    hub = write_task_yaml(get_benchmark("mmbench"), tmp_path, max_new_tokens=8)
    local = write_task_yaml(get_benchmark("mmstar"), tmp_path, data_file=data)
    hub_config = yaml.safe_load((tmp_path / f"{hub}.yaml").read_text().replace("!function", ""))
    local_config = yaml.safe_load((tmp_path / f"{local}.yaml").read_text().replace("!function", ""))
    assert hub_config["dataset_kwargs"] == {}  # `token: True` dropped: it fails without a stored token
    assert hub_config["generation_kwargs"]["max_new_tokens"] == 8
    assert [m["metric"] for m in hub_config["metric_list"]] == ["gpt_eval_score"]  # no .xlsx submission
    assert local_config["dataset_path"] == "parquet"
    assert local_config["dataset_kwargs"] == {"data_files": {"val": str(data)}}
    manager = TaskManager("WARNING", include_path=str(tmp_path), include_defaults=False)
    assert set(manager.all_tasks) == {"dsvlm_mmbench", "dsvlm_mmstar"}


def test_bench_and_data_files_parsing():
    assert parse_benches(["mmbench,synthetic", "mme", "mmbench"]) == ["mmbench", "synthetic", "mme"]
    assert parse_data_files(["synthetic=/d/eval.parquet"]) == {"synthetic": "/d/eval.parquet"}
    with pytest.raises(DsvlmError, match="BENCH=PATH"):
        parse_data_files(["synthetic"])


def test_unknown_bench_lists_the_known_ones(model_shaped_dir):
    result = cli("eval", model_shaped_dir, "--bench", "mmbench,mmbnech")
    assert result.exit_code == 2
    stderr = flat(result.stderr)
    assert "unknown benchmark 'mmbnech'" in stderr
    assert f"known: {', '.join(BENCHMARKS)}" in stderr
    assert "Traceback" not in result.output and not result.stdout


def test_a_path_that_is_not_a_model_is_refused(tmp_path):
    run_like = tmp_path / "run"
    run_like.mkdir()
    (run_like / "recipe.yaml").write_text("stages: []\n")
    result = cli("eval", run_like, "--bench", "mmbench")
    assert result.exit_code == 2
    assert "is not a model directory (no config.json" in flat(result.stderr)
    assert "Traceback" not in result.output and not result.stdout
    with pytest.raises(DsvlmError, match="does not exist"):
        resolve_model(tmp_path / "missing")
    (run_like / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(DsvlmError, match="model_type 'llama', not 'llava'"):
        resolve_model(run_like)


def test_a_bench_without_offline_data_fails_fast(model_shaped_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    # model_shaped_dir cannot load: the offline error, not a loading error, shows the check comes first.
    with pytest.raises(DsvlmError) as error:
        evaluate(model_shaped_dir, ["mmstar"], tmp_path / "out")
    message = str(error.value)
    assert "'mmstar'" in message and "Lin-Chen/MMStar" in message and "--data-files mmstar=" in message
    assert not (tmp_path / "out").exists()

    result = cli("eval", model_shaped_dir, "--bench", "synthetic", "--out", tmp_path / "cli-out")
    assert result.exit_code == 2 and "--data-files synthetic=" in flat(result.stderr)
    assert "Traceback" not in result.output and not (tmp_path / "cli-out").exists()


def test_bad_data_files_are_refused_before_anything_loads(model_shaped_dir, tmp_path):
    with pytest.raises(DsvlmError, match="no such file"):
        evaluate(model_shaped_dir, ["synthetic"], tmp_path, data_files={"synthetic": str(tmp_path / "x.parquet")})
    with pytest.raises(DsvlmError, match="not among the benchmarks run"):
        evaluate(model_shaped_dir, ["synthetic"], tmp_path, data_files={"mme": str(tmp_path)})
    with pytest.raises(DsvlmError, match="not a prepared dataset"):
        evaluate(model_shaped_dir, ["synthetic"], tmp_path, data_files={"synthetic": str(tmp_path)})


def test_compare_gives_per_benchmark_deltas(tmp_path):
    base = {"benchmarks": {"mmbench": {"score": 60.0}, "mme": {"score": 1400.0}}}
    new = {"benchmarks": {"mmbench": {"score": 62.5}, "synthetic": {"score": 90.0}}}
    (tmp_path / "summary.json").write_text(json.dumps(base))
    assert compare(tmp_path, new) == {
        "mmbench": {"base": 60.0, "new": 62.5, "delta": 2.5},
        "mme": {"base": 1400.0, "new": None, "delta": None},
        "synthetic": {"base": None, "new": 90.0, "delta": None},
    }
    with pytest.raises(DsvlmError, match="cannot read eval summary"):
        compare(tmp_path / "nope.json", new)


def test_compare_gives_per_category_deltas():
    base = {
        "benchmarks": {
            "mmbench": {
                "score": 60.0,
                "categories": {"color": {"score": 50.0, "n": 2}, "count": {"score": 70.0, "n": 2}},
            }
        }
    }
    new = {
        "benchmarks": {
            "mmbench": {
                "score": 65.0,
                "categories": {"color": {"score": 60.0, "n": 2}, "shape": {"score": 10.0, "n": 1}},
            }
        }
    }
    assert compare(base, new)["mmbench"] == {
        "base": 60.0,
        "new": 65.0,
        "delta": 5.0,
        "categories": {
            "color": {"base": 50.0, "new": 60.0, "delta": 10.0},
            "count": {"base": 70.0, "new": None, "delta": None},
            "shape": {"base": None, "new": 10.0, "delta": None},
        },
    }
    rows = [[cell for cell in column.cells] for column in compare_table(compare(base, new)).columns]
    assert rows[0] == ["mmbench", "  color", "  count", "  shape"] and rows[3] == ["+5", "+10", "-", "-"]


def test_device_and_dtype_follow_the_machine():
    import torch

    expected = (
        ("cuda", "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
        if torch.cuda.is_available()
        else ("cpu", "float32")
    )
    assert resolve_device() == expected
    assert resolve_device("cpu") == ("cpu", "float32")
    assert resolve_device("cpu", "bfloat16") == ("cpu", "bfloat16")


def test_default_output_is_named_after_model_and_benchmarks_outside_the_model(tmp_path):
    assert default_out_dir(tmp_path / "models" / "ds", ["mmbench", "mme"]) == Path("results/ds/mmbench+mme")
    stripped = tmp_path / "runs" / "ds7b" / "instruct" / "stripped"
    assert default_out_dir(stripped, ["mmvp"], root=tmp_path) == tmp_path / "ds7b-instruct" / "mmvp"


def test_a_large_model_on_cpu_gets_a_warning(tmp_path, monkeypatch, caplog):
    import torch
    from safetensors.torch import save_file

    from dsvlm.evaluation import model_dir

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(tmp_path / "model.safetensors"))
    assert model_dir.count_parameters(tmp_path) == 17
    monkeypatch.setattr(model_dir, "LARGE_ON_CPU", 17)  # the real threshold is a billion parameters
    with caplog.at_level("WARNING"):
        model_dir.warn_if_large_on_cpu(17, "cuda")
        assert not caplog.records
        model_dir.warn_if_large_on_cpu(17, "cpu")
    assert "on the CPU will be very slow" in caplog.text


def test_the_entry_point_resolves_the_dsvlm_class():
    from lmms_eval.models import get_model, get_model_manifest

    from dsvlm.evaluation.lmms_model import DsvlmLlava

    assert get_model("dsvlm") is DsvlmLlava
    assert get_model_manifest("dsvlm").chat_class_path is None  # simple, as DsvlmLlava.is_simple says
