"""What an evaluation runs: a recipe's `eval:` section, with the command line's choices on top.

Light on purpose (no lmms-eval, no torch): settings errors come back before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsvlm.errors import DsvlmError
from dsvlm.evaluation.benches import parse_benches
from dsvlm.recipe.schema import EvalConfig, Recipe


@dataclass(frozen=True)
class EvalSettings:
    benchmarks: list[str]
    data_files: dict[str, str]
    batch_size: int
    max_new_tokens: int | None
    limit: int | None


def eval_settings(
    recipe: Recipe | None,
    benchmarks: list[str] | None = None,
    data_files: dict[str, str] | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    limit: int | None = None,
) -> EvalSettings:
    """Each setting given here (not None) wins over the recipe's `eval:` section, which wins over its defaults.

    Without a recipe the benchmarks must be given. The recipe's local benchmark copies are kept for the
    benchmarks that run; `synthetic` defaults to the recipe's prepared dataset, which declares its eval file.
    """
    section = recipe.eval if recipe is not None else EvalConfig()
    if benchmarks is None and recipe is None:
        raise DsvlmError("no benchmark given: pass --bench NAME, or --recipe NAME|FILE to run its eval.benchmarks")
    names = parse_benches(benchmarks if benchmarks is not None else section.benchmarks)
    files = {name: path for name, path in section.data_files.items() if name in names}
    if recipe is not None and "synthetic" in names:
        files.setdefault("synthetic", recipe.data.dataset)
    files.update(data_files or {})
    return EvalSettings(
        benchmarks=names,
        data_files=files,
        batch_size=batch_size if batch_size is not None else section.batch_size,
        max_new_tokens=max_new_tokens if max_new_tokens is not None else section.max_new_tokens,
        limit=limit if limit is not None else section.limit,
    )
