"""The `lmms_eval.models` entry point: makes `lmms-eval eval --model dsvlm` and `get_model("dsvlm")` work.

Strings only: lmms-eval loads every entry point while it builds its registry, so importing the model class
(torch, transformers) here would slow down every lmms-eval start.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="dsvlm", simple_class_path="dsvlm.evaluation.lmms_model.DsvlmLlava")
