"""`dsvlm eval` end to end on a tiny real LLaVA: lmms-eval scores it, lmms-eval's own `llava_hf` agrees
answer for answer, batching changes nothing, and multiple-choice tasks run through `loglikelihood`."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import Result
from helpers import cli, tiny_vlm

from dsvlm.evaluation import evaluate
from dsvlm.recipe import load_recipe

N_EVAL = 24


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny-synthetic recipe's LLaVA saved as a stripped model. Random weights answer with unrelated
    words; scaling the answer letters' output rows makes greedy answers letters that still depend on the
    input."""
    out = tmp_path_factory.mktemp("model")
    vlm, processor = tiny_vlm(load_recipe("tiny-synthetic").model, seed=0)
    letters = processor.tokenizer.convert_tokens_to_ids(list("ABCD"))
    with torch.no_grad():
        vlm.get_output_embeddings().weight[letters] *= 30
    vlm.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synthetic"
    cli("prepare", "synthetic", out, "--n-align", "1", "--n-instruct", "1", "--n-eval", N_EVAL, check=True)
    return out


def run_eval(model: Path, dataset: Path, out: Path, batch_size: int, *extra: str) -> Result:
    """`dsvlm eval` on the synthetic benchmark as users run it (in process)."""
    return cli(
        "eval",
        model,
        "--bench",
        "synthetic",
        "--data-files",
        f"synthetic={dataset}",
        "--out",
        out,
        "--batch-size",
        batch_size,
        "--max-new-tokens",
        "4",
        *extra,
        env={"COLUMNS": "160"},
        check=True,
    )


@pytest.fixture(scope="module")
def batch8(tiny_model, dataset, tmp_path_factory) -> tuple[str, Path, str]:
    """`dsvlm eval` at batch 8 without --out (run from a scratch folder); returns its stdout, output folder
    and stderr."""
    cwd = tmp_path_factory.mktemp("eval8")
    with contextlib.chdir(cwd):
        result = cli(
            "eval",
            tiny_model,
            "--bench",
            "synthetic",
            "--data-files",
            f"synthetic={dataset}",
            "--batch-size",
            "8",
            "--max-new-tokens",
            "4",
            env={"COLUMNS": "160"},
            check=True,
        )
    return result.stdout, cwd / "results" / tiny_model.name / "synthetic", result.stderr


@pytest.fixture(scope="module")
def batch1(tiny_model, dataset, batch8, tmp_path_factory) -> dict:
    """The same at batch 1, with --json and --compare against the batch-8 run."""
    out = tmp_path_factory.mktemp("eval1")
    return json.loads(run_eval(tiny_model, dataset, out, 1, "--json", "--compare", str(batch8[1])).stdout)


def tiny_model_dir_of(out: Path) -> Path:
    return Path(json.loads((out / "summary.json").read_text())["model"])


def answers(samples_file: str | Path) -> list[str]:
    return [json.loads(line)["filtered_resps"][0] for line in Path(samples_file).read_text().splitlines()]


def test_eval_scores_the_model_through_lmms_eval(batch8):
    stdout, out, _ = batch8
    assert stdout.strip() == str(out / "summary.json")  # the default: results/<model>/<bench>, not in the model
    assert not (tiny_model_dir_of(out) / "eval").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["dtype"] == "float32"  # "auto" without a GPU
    row = summary["benchmarks"]["synthetic"]
    assert row["task"] == "dsvlm_synthetic" and row["metric"] == "gpt_eval_score,none"
    assert row["n"] == N_EVAL and row["data"].endswith("eval/synthetic.parquet")
    assert (out / "results.json").is_file()

    from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator

    # Re-score the saved predictions with MMBench's own static scorer: the summary is the samples' score.
    records = [json.loads(line)["gpt_eval_score"] for line in Path(row["samples"]).read_text().splitlines()]
    assert len(records) == N_EVAL
    overall, _, _ = MMBench_Evaluator().eval_result(records, eval_method="static")
    assert row["score"] == pytest.approx(100 * overall)
    assert len(set(answers(row["samples"]))) > 1  # the parity tests below compare varied answers


def test_summary_scores_each_category(batch8, batch1):
    """Per-category scores in summary.json, the --json output and the table on stderr, equal to a
    recomputation from the samples file: each item's category and its correctness."""
    from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator

    _, out, stderr = batch8
    row = json.loads((out / "summary.json").read_text())["benchmarks"]["synthetic"]
    correct: dict[str, list[int]] = {}
    for line in Path(row["samples"]).read_text().splitlines():
        record = json.loads(line)["gpt_eval_score"]
        hit, _, _ = MMBench_Evaluator().eval_result([record], eval_method="static")  # this item alone
        correct.setdefault(record["category"], []).append(int(hit))
    expected = {
        name: {"score": pytest.approx(100 * sum(hits) / len(hits)), "n": len(hits)} for name, hits in correct.items()
    }
    assert row["categories"] == expected
    assert len(expected) >= 4  # the default question types are several categories
    assert len({part["score"] for part in row["categories"].values()}) > 1
    assert sum(p["score"] * p["n"] for p in row["categories"].values()) / N_EVAL == pytest.approx(row["score"])
    assert batch1["benchmarks"]["synthetic"]["categories"] == row["categories"]  # --json (batch 1: same answers)
    for name, part in row["categories"].items():
        assert re.search(rf"│\s+{name}\s+│\s+│\s+category\s+│\s+{part['score']:.4g}\s+│\s+{part['n']}\s+│", stderr)


def test_batch_8_gives_the_answers_of_batch_1(batch8, batch1):
    one = batch1["benchmarks"]["synthetic"]
    eight = json.loads((batch8[1] / "summary.json").read_text())["benchmarks"]["synthetic"]
    assert answers(one["samples"]) == answers(eight["samples"])
    assert batch1["batch_size"] == 1
    deltas = batch1["compare"]["synthetic"]
    assert (deltas["base"], deltas["new"], deltas["delta"]) == (eight["score"], one["score"], 0.0)
    assert deltas["categories"] == {
        name: {"base": part["score"], "new": part["score"], "delta": 0.0} for name, part in one["categories"].items()
    }


def test_lmms_eval_llava_hf_gives_the_same_answers(tiny_model, dataset, batch1, tmp_path):
    summary = evaluate(
        tiny_model,
        ["synthetic"],
        tmp_path,
        data_files={"synthetic": str(dataset)},
        max_new_tokens=4,
        model="llava_hf",
        model_args={"device_map": "cpu", "device": "cpu"},
    )
    reference = summary["benchmarks"]["synthetic"]
    ours = batch1["benchmarks"]["synthetic"]
    assert answers(reference["samples"]) == answers(ours["samples"])
    assert reference["score"] == ours["score"]


MC_TASK = """\
task: dsvlm_test_mc
dataset_path: parquet
dataset_kwargs:
  data_files:
    dev: {data}
test_split: dev
output_type: multiple_choice
doc_to_visual: !function lmms_eval.tasks.mmbench.en_utils.mmbench_doc_to_visual
doc_to_text: !function lmms_eval.tasks.mmbench.en_utils.mmbench_doc_to_text
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def run_mc(lm, tasks_dir: Path, limit: int = 8) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("WARNING", include_path=str(tasks_dir), include_defaults=False)
    return simple_evaluate(
        model=lm,
        tasks=["dsvlm_test_mc"],
        task_manager=manager,
        limit=limit,
        bootstrap_iters=0,
        log_samples=True,
    )


@pytest.fixture(scope="module")
def mc_tasks(dataset, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mc")
    (folder / "mc.yaml").write_text(MC_TASK.format(data=dataset / "eval" / "synthetic.parquet"))
    return folder


def choice_scores(sample: dict) -> list[float]:
    pairs = sample["filtered_resps"]
    assert all(isinstance(score, float) and isinstance(greedy, bool) for score, greedy in pairs)
    return [score for score, _ in pairs]


@pytest.fixture(scope="module")
def mc_batch8(tiny_model, mc_tasks) -> dict:
    from dsvlm.evaluation.lmms_model import DsvlmLlava

    return run_mc(DsvlmLlava(pretrained=str(tiny_model), batch_size=8), mc_tasks)


def test_multiple_choice_scores_log_probabilities_end_to_end(tiny_model, dataset, mc_tasks, mc_batch8):
    """`loglikelihood` returns summed log-probabilities (<= 0, highest wins), lmms-eval 0.7.3's argmin
    scoring is turned right for them, batching changes nothing, and a direct computation agrees."""
    from dsvlm.evaluation.lmms_model import DsvlmLlava

    samples = mc_batch8["samples"]["dsvlm_test_mc"]
    assert len(samples) == 8
    correct = []
    for sample in samples:
        scores = choice_scores(sample)
        assert len(scores) == 4 and all(score < 0 for score in scores)
        correct.append(float("ABCD"[scores.index(max(scores))] == sample["target"]))
    assert 0 < sum(correct) < len(correct)  # both outcomes occur: argmin would score the complement
    assert mc_batch8["results"]["dsvlm_test_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))

    unbatched = run_mc(DsvlmLlava(pretrained=str(tiny_model), batch_size=1), mc_tasks)["samples"]["dsvlm_test_mc"]
    for batched, single in zip(samples, unbatched, strict=True):
        assert choice_scores(batched) == pytest.approx(choice_scores(single), rel=1e-4)
        assert [g for _, g in batched["filtered_resps"]] == [g for _, g in single["filtered_resps"]]
    eval_file = dataset / "eval" / "synthetic.parquet"
    for choice in range(4):
        expected = reference_logprob(tiny_model, eval_file, samples[0], " " + "ABCD"[choice])
        assert choice_scores(samples[0])[choice] == pytest.approx(expected, rel=1e-4)


def test_llava_hf_loglikelihood_is_not_a_log_probability(tiny_model, dataset, mc_tasks, mc_batch8):
    """Why dsvlm's class exists. lmms-eval 0.7.3's simple `llava_hf.loglikelihood` fails on transformers 5
    (it measures the context by running the processor on text with an image token but no image). What it
    computes where it runs (the context measured by the tokenizer alone, so before the image tokens are
    expanded) is a mean loss over a span that starts inside the prompt: not the continuation's
    log-probability, on the very request dsvlm's class scores right."""
    import datasets
    from lmms_eval.models import get_model

    llava_hf = get_model("llava_hf", force_simple=True).create_from_arg_string(
        f"pretrained={tiny_model},device_map=cpu,device=cpu"
    )
    with pytest.raises(ValueError, match="no images were passed"):
        run_mc(llava_hf, mc_tasks, limit=1)

    sample = mc_batch8["samples"]["dsvlm_test_mc"][0]
    image = datasets.load_dataset("parquet", data_files=str(dataset / "eval" / "synthetic.parquet"), split="train")[
        sample["doc_id"]
    ]["image"].convert("RGB")
    ours = choice_scores(sample)
    for choice, logprob in zip("ABCD", ours, strict=True):
        loss = llava_hf_0_7_3_loglikelihood(llava_hf, sample["arguments"][0], " " + choice, image)
        assert loss > 0 and loss != pytest.approx(-logprob, rel=0.01)
        print(f"doc {sample['doc_id']} choice {choice}: dsvlm log p = {logprob:.4f}, llava_hf = {loss:.4f}")


def llava_hf_0_7_3_loglikelihood(llava_hf, context: str, continuation: str, image) -> float:
    """lmms-eval 0.7.3's `llava_hf.loglikelihood` for one request, line for line, with the context length
    taken from the tokenizer (what its processor call without images gave before transformers 5)."""
    tokenizer = llava_hf.tokenizer
    messages = [
        {"role": "user", "content": f"<image>\n{context}"},
        {"role": "assistant", "content": continuation},
    ]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    inputs = llava_hf._image_processor(text=[full], images=[image], return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[:, : len(tokenizer(prompt)["input_ids"])] = -100
    with torch.inference_mode():
        return float(llava_hf.model(**inputs, labels=labels).loss)


def reference_logprob(model_dir: Path, eval_file: Path, sample: dict, continuation: str) -> float:
    """log p(continuation | prompt, image), summed over its tokens, from transformers' own loss."""
    import datasets
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    image = datasets.load_dataset("parquet", data_files=str(eval_file), split="train")[sample["doc_id"]]["image"]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["arguments"][0]}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    context = processor(text=prompt, images=[image.convert("RGB")], add_special_tokens=False, return_tensors="pt")
    cont = processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    input_ids = torch.cat([context["input_ids"], cont], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -cont.shape[1] :] = cont
    with torch.no_grad():
        loss = model(input_ids=input_ids, pixel_values=context["pixel_values"], labels=labels).loss
    return -float(loss) * cont.shape[1]  # the loss is the mean over the labelled tokens


def test_evaluation_pads_images_as_training_did(tiny_model):
    from PIL import Image

    from dsvlm.evaluation.lmms_model import DsvlmLlava

    lm = DsvlmLlava(pretrained=str(tiny_model), batch_size=1)
    wide = Image.new("RGB", (48, 24), (255, 0, 0))
    fill = tuple(int(x * 255) for x in lm.processor.image_processor.image_mean)
    padded = Image.new("RGB", (48, 48), fill)
    padded.paste(wide, (0, 12))
    got = lm._encode([lm._prompt("What colour is the shape ?", 1)], [wide])["pixel_values"]
    expected = lm.processor.image_processor(images=[padded], return_tensors="pt")["pixel_values"]
    assert torch.equal(got, expected)
    # The processor alone would centre-crop the red: the padding is what changed the input.
    cropped = lm.processor.image_processor(images=[wide], return_tensors="pt")["pixel_values"]
    assert not torch.equal(got, cropped)
