"""Evaluation through lmms-eval: the benchmark registry, the dsvlm lmms-eval model and the runner.

Kept light on purpose: lmms-eval imports `dsvlm.evaluation.registration` (and so this package) while it
builds its model registry, so nothing here may import torch, transformers or lmms-eval at module level.
"""

from dsvlm.evaluation.benches import BENCHMARKS, Benchmark
from dsvlm.evaluation.model_dir import resolve_model
from dsvlm.evaluation.runner import compare, evaluate

__all__ = ["BENCHMARKS", "Benchmark", "compare", "evaluate", "resolve_model"]
