"""Decisions every process of a distributed run must share, made once by the main process."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from dsvlm.errors import DsvlmError, RunFailure

T = TypeVar("T")


def decided_on_main(decide: Callable[[], T]) -> T:
    """`decide()` run by the main process only; its result, or its error, reaches every process.

    For checks of what the main process writes (another process checking meanwhile would see it half made)
    and of files that every process would otherwise read again (a checkpoint's tens of GB at 7B), where the
    processes must not come to different answers. An error on the main process alone would leave the others
    waiting in the next collective: they raise it too, as the same kind of error (exit code)."""
    state = PartialState()
    error: Exception | None = None
    outcome: tuple[str, object] = ("result", None)
    if state.is_main_process:
        try:
            outcome = ("result", decide())
        except DsvlmError as exc:
            error, outcome = exc, ("failure" if isinstance(exc, RunFailure) else "user error", str(exc))
        except Exception as exc:  # a bug, or the file system: the others stop with its text
            error, outcome = exc, ("failure", f"the main process failed: {type(exc).__name__}: {exc}")
    if state.num_processes > 1:
        outcome = broadcast_object_list([outcome])[0]
    if error is not None:
        raise error
    kind, value = outcome
    if kind == "user error":
        raise DsvlmError(value)
    if kind == "failure":
        raise RunFailure(value)
    return value  # type: ignore[return-value]
