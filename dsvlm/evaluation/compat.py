"""Workarounds for two lmms-eval 0.7.3 bugs, applied inside dsvlm (lmms-eval itself is not patched on disk).

1. `simple_evaluate` imports `filelock._api` (to make file locks re-entrant), which filelock 4 no longer
   has: every evaluation crashes. dsvlm pins `filelock<4`; `check_filelock` turns a broken environment into
   a clear error before any model loads.
2. `evaluator.unwrap_generation_output` normalises every model output to text, so the `(float, bool)` pairs
   that `loglikelihood` returns become strings and `multiple_choice` tasks fail while scoring.
   `keep_loglikelihood_pairs` lets exactly those pairs through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Any

from dsvlm.errors import DsvlmError

_PATCH_MARK = "_dsvlm_keeps_loglikelihood_pairs"


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


def is_loglikelihood_pair(output: Any) -> bool:
    """A `loglikelihood` result: `(score, is_greedy)`."""
    return (
        isinstance(output, tuple)
        and len(output) == 2
        and isinstance(output[1], bool)
        and isinstance(output[0], (int, float))
        and not isinstance(output[0], bool)
    )


def keep_loglikelihood_pairs() -> None:
    """Make lmms-eval's evaluator keep `(float, bool)` loglikelihood results as they are (idempotent).

    Only the name the evaluator calls is rebound; every other output still goes through lmms-eval's own
    function, so generation tasks are untouched.
    """
    from lmms_eval import evaluator

    original: Callable[[Any], tuple[Any, Any]] = evaluator.unwrap_generation_output
    if getattr(original, _PATCH_MARK, False):
        return

    def unwrap_generation_output(output: Any) -> tuple[Any, Any]:
        if is_loglikelihood_pair(output):
            return output, None
        return original(output)

    setattr(unwrap_generation_output, _PATCH_MARK, True)
    unwrap_generation_output.__wrapped__ = original  # type: ignore[attr-defined]
    evaluator.unwrap_generation_output = unwrap_generation_output
