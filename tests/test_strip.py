"""`dsvlm strip`: a verified plain LLaVA directory that any transformers user loads."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cli
from safetensors import safe_open
from transformers import AutoProcessor, LlavaForConditionalGeneration

from dsvlm.errors import DsvlmError
from dsvlm.outputs import lock_path
from dsvlm.strip.strip import LLAVA_PREFIXES, load_trained, probe_batch, strip


@pytest.fixture
def run(tiny_run) -> Path:
    """The shared run, read only: strip writes elsewhere (a test that wrote into it would fail the others)."""
    return tiny_run.root


def test_eval_of_a_run_strips_it_on_the_fly(tiny_run, tmp_path):
    run = tiny_run.copy(tmp_path / "run").root  # eval writes the stripped model into the run
    result = cli(
        "eval",
        run,
        "--bench",
        "synthetic",
        "--data-files",
        f"synthetic={tiny_run.data}",
        "--limit",
        "4",
        "--out",
        tmp_path / "eval",
        "--json",
        check=True,
    )
    summary = json.loads(result.stdout)
    assert summary["benchmarks"]["synthetic"]["n"] == 4 and summary["model"] == str(run / "align" / "stripped")
    assert (run / "align" / "stripped" / "config.json").is_file()


def test_strip_writes_a_plain_llava_that_matches_the_training_model(run, tmp_path):
    out = tmp_path / "model"
    result = cli("strip", run, "--out", out, "--json", check=True)
    report = json.loads(result.stdout)
    assert report["output"] == str(out)
    assert report["params_removed"] > 0 and report["params_after"] < report["params_before"]
    assert report["bytes_after"] < report["bytes_before"]

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava"
    for name in ("generation_config.json", "README.md", "tokenizer.json", "processor_config.json"):
        assert (out / name).is_file(), name
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            assert all(k.startswith(LLAVA_PREFIXES) for k in list(f.keys()))

    loaded, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = AutoProcessor.from_pretrained(out)
    assert "<image>" in processor.tokenizer.get_vocab()
    _, trained = load_trained(run)
    batch = probe_batch(trained)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, trained.vlm(**batch).logits)
    assert "stage" in (out / "README.md").read_text()


def test_strip_replaces_only_an_earlier_stripped_model(run, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    refused = cli("strip", run, "--out", out)
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr
    refused = cli("strip", run, "--out", out, "--overwrite")
    assert refused.exit_code == 2 and "not a stripped model written by dsvlm" in refused.stderr
    assert (out / "keep.txt").read_text() == "precious"

    (out / "keep.txt").unlink()
    assert cli("strip", run, "--out", out).exit_code == 0  # an empty folder is fine
    deprecated = cli("strip", run, "--out", out, "--force")
    assert deprecated.exit_code == 0 and "--force is deprecated" in deprecated.stderr
    assert (out / "config.json").is_file()


@pytest.mark.parametrize("where", ["run", "stage", "inside", "parent"])
def test_strip_refuses_an_out_that_is_holds_or_lies_inside_its_source(run, where):
    out = {"run": run, "stage": run / "align", "inside": run / "model", "parent": run.parent}[where]
    before = sorted(p.relative_to(run.parent) for p in run.parent.rglob("*"))
    result = cli("strip", run, "--out", out, "--overwrite")
    assert result.exit_code == 2 and "lies inside the input" in result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.relative_to(run.parent) for p in run.parent.rglob("*")) == before


def test_a_second_writer_of_the_same_out_stops_at_once(run, tmp_path):
    out = tmp_path / "model"
    lock_path(out).write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live process writes it
    result = cli("strip", run, "--out", out)
    assert result.exit_code == 2 and f"(pid {os.getppid()}" in result.stderr
    assert not out.exists()


def test_strip_of_an_incomplete_run_is_a_clear_error(run, tmp_path):
    with pytest.raises(DsvlmError, match="not a finished stage output"):
        strip(tmp_path, tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    final = run / "align" / "final"
    for item in final.iterdir():
        if item.is_file():
            (broken / item.name).write_bytes(item.read_bytes())
    result = cli("strip", broken, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_push_to_hub_offline_fails_fast(run, tmp_path):
    result = cli("strip", run, "--out", tmp_path / "m", "--push-to-hub", "me/tiny", env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 2 and "offline" in result.stderr
    assert (tmp_path / "m" / "config.json").is_file()  # the stripped model is kept


def test_strip_needs_no_diffusion_weights(run, tmp_path):
    """The diffusion source is gone after training (e.g. an SD 1.5 from the hub, offline): strip still works,
    and reports the branch size from the output's metadata."""
    final = tmp_path / "run" / "align" / "final"
    shutil.copytree(run / "align" / "final", final)
    recipe = yaml.safe_load((final / "recipe.yaml").read_text())
    recipe["supervision"]["diffusion"]["pretrained"] = str(tmp_path / "deleted-sd15")
    (final / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    branch = json.loads((final / "supervision" / "supervision.json").read_text())["branch_parameters"]
    report = strip(final, tmp_path / "out")
    assert report.params_removed == branch > 0
    assert (tmp_path / "out" / "config.json").is_file()
