"""The lmms-eval 0.7.3 workarounds (dsvlm/evaluation/compat.py): each one detects its bug in the installed
lmms-eval, works around it, and is a no-op when fed the fixed behaviour instead."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from dsvlm.errors import DsvlmError
from dsvlm.evaluation.compat import (
    LogProb,
    check_filelock,
    keep_loglikelihood_pairs,
    picks_lowest_score,
    score_logprobs_by_argmax,
    stringifies_loglikelihood_pairs,
    task_yaml_fixes,
)


def test_filelock_4_is_refused_with_the_fix():
    check_filelock()  # the installed one is fine (pinned <4)
    check_filelock("3.20.0")
    with pytest.raises(DsvlmError, match="pip install 'filelock<4'"):
        check_filelock("4.0.2")


def fixed_unwrap(output: Any) -> tuple[Any, Any]:
    """What a fixed lmms-eval would do: leave non-text outputs alone."""
    return output, None


def test_stringified_pairs_are_kept_only_where_lmms_eval_stringifies_them():
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output

    # The bug, in the installed lmms-eval 0.7.3 (if this fails, lmms-eval fixed it).
    assert unwrap_generation_output((-1.5, True)) == ("(-1.5, True)", None)
    assert stringifies_loglikelihood_pairs(unwrap_generation_output)

    buggy = SimpleNamespace(unwrap_generation_output=unwrap_generation_output)
    assert keep_loglikelihood_pairs(buggy) and keep_loglikelihood_pairs(buggy)  # idempotent: one wrapper
    assert buggy.unwrap_generation_output.__wrapped__ is unwrap_generation_output
    assert buggy.unwrap_generation_output((-1.5, True)) == ((-1.5, True), None)
    assert buggy.unwrap_generation_output(GenerationResult("B")) == ("B", None)
    assert buggy.unwrap_generation_output("B") == ("B", None)

    fixed = SimpleNamespace(unwrap_generation_output=fixed_unwrap)
    assert not keep_loglikelihood_pairs(fixed)
    assert fixed.unwrap_generation_output is fixed_unwrap  # untouched


def mc_task(gold: int = 0) -> SimpleNamespace:
    """The attributes `process_results` reads for a two-choice item."""
    return SimpleNamespace(
        OUTPUT_TYPE="multiple_choice",
        _metric_fn_list={"acc": None},
        config=SimpleNamespace(process_results=None),
        doc_to_choice=lambda doc: ["A", "B"],
        doc_to_target=lambda doc: gold,
        multiple_input=False,
        multiple_target=False,
    )


class FixedTask:
    """A task class whose scoring picks the highest log-probability, as lm-eval does."""

    def process_results(self, doc: Any, results: list[tuple[float, bool]]) -> dict[str, float]:
        scores = [score for score, _ in results]
        return {"acc": float(scores.index(max(scores)) == self.doc_to_target(doc))}


def test_multiple_choice_scores_log_probs_by_argmax_only_where_lmms_eval_uses_argmin():
    from lmms_eval.api.task import ConfigurableTask

    original = ConfigurableTask.process_results
    if getattr(original, "_dsvlm_workaround", False):  # another test in this process ran an evaluation
        original = original.__wrapped__
    # The bug, in the installed lmms-eval 0.7.3: the likelier gold answer (-1 > -9) scores 0.
    assert original(mc_task(), {}, [(-1.0, True), (-9.0, False)])["acc"] == 0.0
    assert picks_lowest_score(original)

    class BuggyTask(ConfigurableTask):  # a subclass: the patch lands on it, not on lmms-eval's class
        process_results = original

    assert score_logprobs_by_argmax(BuggyTask) and score_logprobs_by_argmax(BuggyTask)  # idempotent
    assert BuggyTask.process_results.__wrapped__ is original
    tagged = [(LogProb(-1.0), True), (LogProb(-9.0), False)]
    assert BuggyTask.process_results(mc_task(gold=0), {}, tagged)["acc"] == 1.0
    assert BuggyTask.process_results(mc_task(gold=1), {}, tagged)["acc"] == 0.0
    # Untagged results (another class's losses, e.g. llava_hf's) are still scored by argmin.
    assert BuggyTask.process_results(mc_task(gold=1), {}, [(1.0, True), (9.0, False)])["acc"] == 0.0
    assert BuggyTask.process_results(mc_task(gold=0), {}, [(1.0, True), (9.0, False)])["acc"] == 1.0

    assert not picks_lowest_score(FixedTask.process_results)
    unpatched = FixedTask.process_results
    assert not score_logprobs_by_argmax(FixedTask)
    assert FixedTask.process_results is unpatched
    assert FixedTask.process_results(mc_task(gold=0), {}, tagged)["acc"] == 1.0


def test_log_probs_serialise_as_plain_floats():
    import json

    assert json.dumps([LogProb(-2.5), True]) == "[-2.5, true]"


def test_task_yaml_fixes_drop_the_token_flag_for_hub_data_only():
    original = {"dataset_kwargs": {"token": True, "cache_dir": "x"}}
    assert task_yaml_fixes(original, local_data=False) == {"dataset_kwargs": {"cache_dir": "x"}}
    assert task_yaml_fixes({}, local_data=False) == {"dataset_kwargs": {}}
    assert task_yaml_fixes(original, local_data=True) == {}
