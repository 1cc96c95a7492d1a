"""Benchmark registry: dsvlm names -> lmms-eval 0.7.3 tasks, where their data comes from, and the task
YAMLs dsvlm writes for them.

Every benchmark runs as a task YAML that dsvlm generates in a temporary include folder. It `include`s the
original lmms-eval task (so prompts and scoring functions stay lmms-eval's own) and overrides only what must
change: a name of its own (built-in names win on a clash), no `tag`, no `token: True` (it fails without a
stored token, even offline), a local file instead of the hub dataset when one is given, and for the MMBench
family the score metric alone (the `submission` metric writes an .xlsx and needs openpyxl).

Light on purpose (no lmms-eval import): name and data errors must come back before anything heavy loads.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from dsvlm.errors import DataError, DsvlmError
from dsvlm.evaluation.compat import task_yaml_fixes

# Local file suffix -> the `datasets` builder that reads it.
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


class Function(str):
    """A `!function module.name` reference in a generated task YAML."""


_MMBENCH_SCORE_ONLY = [
    {
        "metric": "gpt_eval_score",
        "aggregation": Function("lmms_eval.tasks.mmbench.en_utils.mmbench_aggregate_dev_results_static"),
        "higher_is_better": True,
    }
]


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: the lmms-eval task it runs and the metric dsvlm reports."""

    name: str  # dsvlm's name (`--bench`)
    task: str  # the lmms-eval 0.7.3 task whose prompts and scoring it reuses
    yaml: str  # that task's YAML, relative to lmms-eval's task folder
    metric: str  # the headline metric in summary.json
    description: str
    hub: bool = True  # False: local data only (`--data-files`)
    judge: bool = False  # scored by an OpenAI-compatible judge (needs OPENAI_API_KEY)
    judge_role: str = ""  # what the judge does, for the error when none is configured
    requires: Mapping[str, str] = field(default_factory=dict)  # import name -> pip name, beyond lmms-eval's list
    overrides: Mapping[str, Any] = field(default_factory=dict)  # task YAML keys dsvlm replaces

    @property
    def yaml_path(self) -> Path:
        """The original task YAML inside the installed lmms-eval."""
        return tasks_dir() / self.yaml

    def task_config(self) -> dict[str, Any]:
        """The original task's YAML with its includes resolved (`!function` values read as None)."""
        return _read_task_yaml(self.yaml_path)

    @property
    def local_task(self) -> str:
        """Name of the task dsvlm generates for this benchmark."""
        return f"dsvlm_{self.name}"


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark(
            "mmbench",
            "mmbench_en_dev_static",
            "mmbench/mmbench_en_dev_static.yaml",
            "gpt_eval_score",
            "MMBench-EN dev, letter extracted by regex (no OpenAI judge)",
            overrides={"metric_list": _MMBENCH_SCORE_ONLY},
        ),
        Benchmark("mmstar", "mmstar", "mmstar/mmstar.yaml", "average", "MMStar val"),
        Benchmark("mmmu", "mmmu_val", "mmmu/mmmu_val.yaml", "mmmu_acc", "MMMU validation"),
        Benchmark(
            "mathvista",
            "mathvista_testmini_format",
            "mathvista/mathvista_testmini_format.yaml",
            "llm_as_judge_eval",
            "MathVista testmini (answer extraction by an OpenAI-compatible judge)",
            judge=True,
            judge_role="extracts the answer from every reply that is not already a choice or a number",
            requires={"Levenshtein": "levenshtein"},  # imported by the task's utils.py
        ),
        Benchmark("ocrbench", "ocrbench", "ocrbench/ocrbench.yaml", "ocrbench_accuracy", "OCRBench"),
        Benchmark("ai2d", "ai2d", "ai2d/ai2d.yaml", "exact_match", "AI2D test"),
        Benchmark(
            "hallusionbench",
            "hallusion_bench_image",
            "hallusion_bench/hallusion_bench_image.yaml",
            "aAcc",
            "HallusionBench image split (scored by an OpenAI-compatible judge)",
            judge=True,
            judge_role="decides whether each reply agrees with the ground truth",
        ),
        Benchmark(
            "llava_bench",
            "llava_in_the_wild",
            "llava-in-the-wild/llava-in-the-wild.yaml",
            "gpt_eval_llava_all",
            "LLaVA-Bench in the wild (scored by an OpenAI-compatible judge)",
            judge=True,
            judge_role="rates every reply against a reference answer (GPT-4 review)",
        ),
        Benchmark("scienceqa", "scienceqa_img", "scienceqa/scienceqa_img.yaml", "exact_match", "ScienceQA-IMG test"),
        Benchmark("mme", "mme", "mme/mme.yaml", "mme_perception_score", "MME (perception score)"),
        # Not in the paper; the benchmarks where reconstruction-style methods report their largest gains.
        Benchmark("mmvp", "mmvp", "mmvp/mmvp.yaml", "mmvp_accuracy", "MMVP (CLIP-blind pairs), per-question accuracy"),
        Benchmark("cv_bench", "cv_bench", "cv_bench/cv_bench.yaml", "cv_bench_acc", "CV-Bench (2D and 3D), accuracy"),
        Benchmark(
            "synthetic",
            "mmbench_en_dev_static",
            "mmbench/mmbench_en_dev_static.yaml",
            "gpt_eval_score",
            "dsvlm's held-out synthetic set in MMBench schema (`dsvlm prepare synthetic OUT`)",
            hub=False,
            # One-letter answers: lmms-eval's MMBench default of 1024 new tokens only costs time.
            overrides={
                "metric_list": _MMBENCH_SCORE_ONLY,
                "generation_kwargs": {
                    "until": ["ASSISTANT:"],
                    "max_new_tokens": 16,
                    "temperature": 0,
                    "do_sample": False,
                },
            },
        ),
    ]
}


def tasks_dir() -> Path:
    """lmms-eval's task folder, found without importing lmms-eval (which pulls in torch)."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DsvlmError("lmms-eval is not installed; run `make install` (it adds lmms-eval 0.7.3 --no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called `name`, or an error listing the known ones."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise DsvlmError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None


def parse_benches(spec: str | list[str]) -> list[str]:
    """`"mmbench,synthetic"` or a list of such strings -> validated, de-duplicated names in order."""
    items = [spec] if isinstance(spec, str) else spec
    names = [n.strip() for item in items for n in item.split(",") if n.strip()]
    if not names:
        raise DsvlmError(f"no benchmark given; known: {', '.join(BENCHMARKS)}")
    for name in names:
        get_benchmark(name)
    return list(dict.fromkeys(names))


def parse_data_files(items: list[str]) -> dict[str, str]:
    """`["bench=PATH", ...]` (the repeatable --data-files option) -> {bench: PATH}."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise DsvlmError(f"--data-files expects BENCH=PATH, got {item!r}")
        out[get_benchmark(name.strip()).name] = path.strip()
    return out


def resolve_data_file(bench: Benchmark, path: str | Path) -> Path:
    """A local copy of `bench`'s data: a file, or a prepared dataset folder declaring it."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = _declared_eval_file(bench, path)
    if not path.is_file():
        raise DataError(f"--data-files {bench.name}={path}: no such file")
    if path.suffix not in BUILDERS:
        raise DataError(
            f"--data-files {bench.name}={path}: unsupported file type {path.suffix!r}; use one of {', '.join(BUILDERS)}"
        )
    return path.resolve()


def _declared_eval_file(bench: Benchmark, folder: Path) -> Path:
    """The eval file a prepared dataset (`dsvlm prepare`) declares for `bench` in its manifest."""
    from dsvlm.data.prepared import PreparedDataset

    declared = PreparedDataset(folder).eval_files
    if bench.name not in declared:
        raise DataError(
            f"the prepared dataset {folder} declares no eval file for {bench.name!r} "
            f"(it has: {', '.join(declared) or 'none'}); pass the file itself"
        )
    return declared[bench.name]


def ensure_available(bench: Benchmark, data_file: Path | None) -> None:
    """Fail at once, with the remedy, when `bench` has neither a local file nor reachable hub data.

    Without this, a missing dataset shows up minutes later as a `datasets` retry loop or a stack trace.
    """
    if data_file is not None:
        return
    if not bench.hub:
        raise DsvlmError(
            f"benchmark {bench.name!r} has no hub dataset: pass --data-files {bench.name}=PATH "
            "(a prepared dataset folder or its eval parquet, e.g. from `dsvlm prepare synthetic OUT`)"
        )
    config = bench.task_config()
    repo = config["dataset_path"]
    if _in_hf_cache(repo):
        return
    split = config.get("test_split")
    remedy = (
        f"pass a local copy: --data-files {bench.name}=FILE.parquet (split {split!r} of {repo}, in the "
        f"schema lmms-eval's task {bench.task!r} reads)"
    )
    if _offline():
        raise DsvlmError(
            f"benchmark {bench.name!r} needs the hub dataset {repo}, which is not in the local "
            f"cache, and HF_HUB_OFFLINE is set; {remedy}"
        )
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(repo, timeout=10)
    except Exception as exc:  # any failure means lmms-eval would fail too, only later and slower
        raise DsvlmError(
            f"benchmark {bench.name!r}: the hub dataset {repo} is not cached and cannot be reached "
            f"({type(exc).__name__}: {exc}); {remedy}"
        ) from exc


def ensure_requirements(bench: Benchmark) -> None:
    """Fail at once when the task's own code imports a package that is not installed (lmms-eval is installed
    without its dependencies, and the task would otherwise fail after the model has loaded)."""
    missing = [pip for module, pip in bench.requires.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise DsvlmError(
            f"benchmark {bench.name!r}: lmms-eval's task {bench.task} imports {', '.join(bench.requires)}, "
            f"which is not installed; run: pip install {' '.join(missing)}"
        )


def ensure_judge(bench: Benchmark, timeout: float = 5.0) -> None:
    """Fail at once when `bench` needs an LLM judge that is not configured or cannot be reached.

    lmms-eval's judge clients retry with sleeps (and its `process_results` retries 5 times more), so a
    missing judge otherwise shows up minutes later as a zero score or a stack trace.
    """
    if not bench.judge:
        return
    api_type = os.environ.get("API_TYPE", "openai").lower()
    key_var, url_var, default_url = (
        ("AZURE_API_KEY", "AZURE_ENDPOINT", "")
        if api_type == "azure"
        else ("OPENAI_API_KEY", "OPENAI_API_URL", "https://api.openai.com/v1")
    )
    url = os.environ.get(url_var) or default_url
    judge = (
        f"benchmark {bench.name!r} (lmms-eval task {bench.task}) needs an LLM judge, which "
        f"{bench.judge_role}: an OpenAI-compatible chat model (MODEL_VERSION, default gpt-4o-2024-11-20)"
    )
    howto = (
        "set OPENAI_API_KEY (and OPENAI_API_URL for another OpenAI-compatible server, MODEL_VERSION for its "
        "model), or API_TYPE=azure with AZURE_API_KEY and AZURE_ENDPOINT; or leave the benchmark out"
    )
    if not os.environ.get(key_var):
        raise DsvlmError(f"{judge}; none is configured ({key_var} is not set): {howto}")
    host, port = _host_port(url)
    if host is None:
        raise DsvlmError(f"{judge}; {url_var}={url!r} is not a URL: {howto}")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise DsvlmError(f"{judge}; the judge at {url} cannot be reached ({exc}): {howto}") from exc


def _host_port(url: str) -> tuple[str | None, int]:
    parsed = urlparse(url)
    return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)


def write_task_yaml(
    bench: Benchmark, folder: Path, data_file: Path | None = None, max_new_tokens: int | None = None
) -> str:
    """Write the task YAML that runs `bench` into `folder` and return its task name."""
    original = bench.task_config()
    config: dict[str, Any] = {"include": str(bench.yaml_path), "task": bench.local_task, "tag": []}
    config.update(bench.overrides)
    if data_file is not None:
        config.update(
            dataset_path=BUILDERS[data_file.suffix],
            dataset_name=None,
            dataset_kwargs={"data_files": {original["test_split"]: str(data_file)}},
        )
    config.update(task_yaml_fixes(original, local_data=data_file is not None))
    if max_new_tokens is not None:
        generation = dict(config.get("generation_kwargs") or original.get("generation_kwargs") or {})
        generation["max_new_tokens"] = min(max_new_tokens, int(generation.get("max_new_tokens", max_new_tokens)))
        config["generation_kwargs"] = generation
    (folder / f"{bench.local_task}.yaml").write_text(yaml.dump(config, Dumper=_TaskDumper, sort_keys=False))
    return bench.local_task


class _TaskLoader(yaml.SafeLoader):
    """Reads lmms-eval task YAMLs without importing the functions they name."""


_TaskLoader.add_constructor("!function", lambda loader, node: None)


class _TaskDumper(yaml.SafeDumper):
    """Writes `Function` values as `!function` tags."""


_TaskDumper.add_representer(Function, lambda dumper, data: dumper.represent_scalar("!function", str(data)))


def _read_task_yaml(path: Path) -> dict[str, Any]:
    """lmms-eval's include resolution: the first listed include wins, the file itself wins over all."""
    if not path.is_file():
        raise DsvlmError(f"lmms-eval task file {path} is missing; this dsvlm expects lmms-eval 0.7.3")
    data = yaml.load(path.read_text(), Loader=_TaskLoader) or {}
    includes = data.pop("include", [])
    merged: dict[str, Any] = {}
    for include in reversed([includes] if isinstance(includes, str) else includes):
        merged.update(_read_task_yaml(path.parent / include))
    merged.update(data)
    return merged


def _offline() -> bool:
    """Whether `datasets` (which lmms-eval loads the task data with) will refuse the network: HF_HUB_OFFLINE,
    overridden by HF_DATASETS_OFFLINE, as `datasets` itself reads them."""
    from datasets import config  # imported here: half a second, paid only when the data is not cached

    return bool(config.HF_HUB_OFFLINE)


def _in_hf_cache(repo: str) -> bool:
    """Whether `repo` was downloaded before: the hub cache, or a datasets cache lmms-eval reads from. The
    locations as huggingface_hub resolves them (HF_HOME, XDG_CACHE_HOME, HF_HUB_CACHE); the datasets cache as
    `datasets.config` derives it, without importing datasets."""
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE).expanduser()
    caches = [Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets")).expanduser()]
    if os.environ.get("LMMS_EVAL_DATASETS_CACHE"):
        caches.append(Path(os.environ["LMMS_EVAL_DATASETS_CACHE"]).expanduser())
    return (hub / f"datasets--{repo.replace('/', '--')}").is_dir() or any(
        (cache / repo.replace("/", "___")).is_dir() for cache in caches
    )
