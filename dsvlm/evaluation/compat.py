"""Every workaround dsvlm needs for lmms-eval 0.7.3, in one place. Nothing is patched on disk.

Each one names the bug it works around, checks at run time whether the installed lmms-eval still has it,
and does nothing when it does not (so a fixed lmms-eval runs unpatched):

1. filelock 4: `simple_evaluate` imports `filelock._api` (to make file locks re-entrant), which filelock 4
   no longer has, so every evaluation crashes. dsvlm pins `filelock<4`; `check_filelock` turns a broken
   environment into a clear error before any model loads.
2. Stringified loglikelihood pairs: `evaluator.unwrap_generation_output` normalises every model output to
   text, so the `(float, bool)` pairs of `loglikelihood` become strings and `multiple_choice` tasks fail
   while scoring. `keep_loglikelihood_pairs` lets exactly those pairs through.
3. Multiple choice by argmin: `ConfigurableTask.process_results` picks the choice with the *lowest* value
   ("we return the actual loss in many model loglikelihood, we just use the argmin here"), whereas the
   `loglikelihood` API (and lm-eval) return log-probabilities, highest wins. dsvlm's class returns true
   log-probabilities tagged `LogProb`; `score_logprobs_by_argmax` hands lmms-eval their negation (a loss)
   for those results only, so untagged results (e.g. `llava_hf`'s losses) are scored as before.
4. Hub token (`task_yaml_fixes`): `dataset_kwargs.token: True` fails without a stored hub token, even offline.
   (The MMBench family's `submission` metric, an .xlsx that needs openpyxl, is left out by the benchmark
   registry's metric choice, not here.)
5. Loguru on stdout: lmms-eval points loguru at stdout on import (`route_lmms_eval_logs` moves it to
   stderr), and task aggregations write `./submissions` unless given an output path (`lmms_cli_args`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dsvlm.errors import DsvlmError

log = logging.getLogger(__name__)

_PATCH_MARK = "_dsvlm_workaround"


# 1. filelock 4 ---------------------------------------------------------------------------------------------


def check_filelock(version: str | None = None) -> None:
    """Raise a DsvlmError when the installed (or given) filelock is 4.x or newer."""
    if version is None:
        try:
            version = metadata.version("filelock")
        except metadata.PackageNotFoundError:
            return
    major = version.split(".", 1)[0]
    if major.isdigit() and int(major) >= 4:
        raise DsvlmError(
            f"filelock {version} is installed, but lmms-eval 0.7.3 crashes with filelock 4 "
            "(it imports filelock._api); run: pip install 'filelock<4'"
        )


# 2. stringified loglikelihood pairs -------------------------------------------------------------------------


def is_loglikelihood_pair(output: Any) -> bool:
    """A `loglikelihood` result: `(score, is_greedy)`."""
    return (
        isinstance(output, tuple)
        and len(output) == 2
        and isinstance(output[1], bool)
        and isinstance(output[0], (int, float))
        and not isinstance(output[0], bool)
    )


def stringifies_loglikelihood_pairs(unwrap: Callable[[Any], tuple[Any, Any]]) -> bool:
    """Whether `unwrap` (lmms-eval's `unwrap_generation_output`) turns a `(float, bool)` pair into text."""
    return unwrap((-1.5, True))[0] != (-1.5, True)


def keep_loglikelihood_pairs(evaluator: Any = None) -> bool:
    """Make lmms-eval's evaluator keep `(float, bool)` loglikelihood results as they are (idempotent).

    Only the name the evaluator calls is rebound; every other output still goes through lmms-eval's own
    function, so generation tasks are untouched. `evaluator` defaults to `lmms_eval.evaluator`. Returns
    whether the workaround is in place (False: this lmms-eval has no such bug).
    """
    if evaluator is None:
        from lmms_eval import evaluator
    original: Callable[[Any], tuple[Any, Any]] = evaluator.unwrap_generation_output
    if getattr(original, _PATCH_MARK, False):
        return True
    if not stringifies_loglikelihood_pairs(original):
        return False

    def unwrap_generation_output(output: Any) -> tuple[Any, Any]:
        if is_loglikelihood_pair(output):
            return output, None
        return original(output)

    setattr(unwrap_generation_output, _PATCH_MARK, True)
    unwrap_generation_output.__wrapped__ = original  # type: ignore[attr-defined]
    evaluator.unwrap_generation_output = unwrap_generation_output
    return True


# 3. multiple choice by argmin --------------------------------------------------------------------------------


class LogProb(float):
    """A continuation's summed log-probability (<= 0, higher is likelier), as dsvlm's `loglikelihood`
    returns it. The type tells the scoring workaround which results to turn into losses; it serialises as
    a plain float."""


def picks_lowest_score(process_results: Callable[..., dict[str, Any]]) -> bool:
    """Whether lmms-eval's `ConfigurableTask.process_results` picks a multiple-choice answer by argmin.

    Probed with a two-choice item whose gold choice has the higher log-probability. If the probe cannot
    run (lmms-eval's internals moved), lmms-eval 0.7.x is assumed to have the bug and later ones not.
    """
    task = SimpleNamespace(
        OUTPUT_TYPE="multiple_choice",
        _metric_fn_list={"acc": None},
        config=SimpleNamespace(process_results=None),
        doc_to_choice=lambda doc: ["A", "B"],
        doc_to_target=lambda doc: 0,
        multiple_input=False,
        multiple_target=False,
    )
    # tenacity's retry wrapper would retry a failing probe for seconds: call the function it wraps.
    probe = getattr(process_results, "__wrapped__", process_results)
    try:
        return probe(task, {}, [(-1.0, True), (-9.0, False)])["acc"] == 0.0
    except Exception as exc:
        version = metadata.version("lmms_eval")
        log.warning("cannot probe lmms-eval %s's multiple-choice scoring (%s); assuming by version", version, exc)
        return version.startswith("0.7.")


def score_logprobs_by_argmax(task_class: Any = None) -> bool:
    """Make lmms-eval score `LogProb` results of multiple-choice tasks by their highest log-probability.

    `task_class` defaults to `lmms_eval.api.task.ConfigurableTask`. Returns whether the workaround is in
    place (False: this lmms-eval already picks the highest log-probability).
    """
    if task_class is None:
        from lmms_eval.api.task import ConfigurableTask as task_class
    original = task_class.process_results
    if getattr(original, _PATCH_MARK, False):
        return True
    if not picks_lowest_score(original):
        return False

    def process_results(self: Any, doc: Any, results: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if (
            self.OUTPUT_TYPE == "multiple_choice"
            and results
            and all(is_loglikelihood_pair(r) and isinstance(r[0], LogProb) for r in results)
        ):
            # Losses, so argmin is right. (`acc_mutual_info`, an argmax over differences, would invert; no
            # dsvlm benchmark uses it.)
            results = [(-float(score), greedy) for score, greedy in results]
        return original(self, doc, results, *args, **kwargs)

    setattr(process_results, _PATCH_MARK, True)
    process_results.__wrapped__ = original  # type: ignore[attr-defined]
    task_class.process_results = process_results
    return True


def apply_workarounds() -> None:
    """Every run-time workaround above that the installed lmms-eval needs (idempotent)."""
    check_filelock()
    keep_loglikelihood_pairs()
    score_logprobs_by_argmax()


# 4. task YAML details ----------------------------------------------------------------------------------------


def task_yaml_fixes(original: dict[str, Any], local_data: bool) -> dict[str, Any]:
    """Overrides for a generated task YAML that lmms-eval 0.7.3 needs to run offline."""
    if local_data:
        return {}
    # `token: True` fails without a stored token, even offline.
    return {"dataset_kwargs": {k: v for k, v in (original.get("dataset_kwargs") or {}).items() if k != "token"}}


# 5. where lmms-eval writes ----------------------------------------------------------------------------------


def route_lmms_eval_logs() -> None:
    """lmms-eval points loguru at stdout when imported; send its warnings to stderr instead."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def lmms_cli_args(out: Path) -> argparse.Namespace:
    """The `lmms-eval` CLI arguments that `simple_evaluate` and the tasks' aggregations read.

    Without an output path, aggregations such as MMBench's write into `./submissions` of the working folder.
    """
    return argparse.Namespace(
        output_path=str(out), process_with_media=False, reasoning_tags=None, agentic_trace_mode="basic"
    )
