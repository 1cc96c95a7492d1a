"""Linear probes of a model's frozen visual features: what each encoder layer and the connector hold.

Probe images come from the synthetic generator itself, from two fixed streams (a train split and a held-out
test split), so every model is probed on the same pictures whatever it was trained on:
- single-object scenes for the object's colour, shape, position and size;
- scenes of 1 to 4 objects for the count.

Features: every vision-encoder hidden state (embeddings = layer 0) and the connector output, mean-pooled over
the image tokens, and per patch (flattened) where that stays small. Each (feature, attribute) pair gets a
multinomial logistic regression (standardised features, small L2, full-batch L-BFGS, fixed budget and seed)
fitted on the train split and scored on the test split. Chance = the majority class share of the test split.

Outputs (each written atomically) in OUT: probe.json, probe.md (the table), probe.png (layer x attribute).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dsvlm.data.synthetic import Scene, render, sample_scene
from dsvlm.errors import DsvlmError
from dsvlm.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

PROBE_JSON, PROBE_TABLE, PROBE_PLOT = "probe.json", "probe.md", "probe.png"
MAX_COUNT = 4  # objects in a count scene, at most (the generator's largest layout)
PER_PATCH_MAX_DIM = 8192  # flattened per-patch features only up to this width: a CLIP-L layer would be 590k
CONNECTOR = "connector"

# Attribute -> (which scene set it is read from, how to read the label from a scene).
ATTRIBUTES: dict[str, tuple[str, Callable[[Scene], str]]] = {
    "colour": ("single", lambda scene: scene.objects[0].colour),
    "shape": ("single", lambda scene: scene.objects[0].shape),
    "position": ("single", lambda scene: scene.objects[0].position),
    "size": ("single", lambda scene: scene.objects[0].size),
    "count": ("multi", lambda scene: str(len(scene.objects))),
}


@dataclass(frozen=True)
class ProbeConfig:
    """Sizes and budget of a probe run (the options of `dsvlm probe`)."""

    n_train: int = 1024
    n_test: int = 512
    steps: int = 100  # L-BFGS iterations, full batch
    l2: float = 1e-3
    seed: int = 0
    per_patch: bool = True  # also flattened per-patch features, where they fit PER_PATCH_MAX_DIM
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise DsvlmError(f"probe {name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.l2 < 0:
            raise DsvlmError(f"probe l2 must be >= 0, got {self.l2}")


def probe_scenes(split: str, n: int, kind: str) -> list[Scene]:
    """`n` scenes of the fixed `split` stream (train/test) of one scene set (single/multi)."""
    rng = random.Random(f"dsvlm-probe/{split}/{kind}")
    return [sample_scene(rng, 1 if kind == "single" else MAX_COUNT) for _ in range(n)]


def fit_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    steps: int = 100,
    l2: float = 1e-3,
    seed: int = 0,
) -> float:
    """Test accuracy of a multinomial logistic regression fitted on (train_x, train_y). Labels are 0..K-1."""
    torch.manual_seed(seed)
    train_x, test_x = train_x.float(), test_x.float()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)  # constant features stay 0, not NaN
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=steps,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train_x @ weight + bias, train_y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = (test_x @ weight + bias).argmax(1)
    return float((predicted == test_y).float().mean())


def chance_level(labels: torch.Tensor) -> float:
    """Accuracy of always answering the most frequent class."""
    return float(torch.bincount(labels).max()) / len(labels)


def image_side(model: Any, processor: Any) -> int:
    """The square input side the model's processor produces."""
    crop = getattr(processor.image_processor, "crop_size", None)
    side = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
    return int(side or model.config.vision_config.image_size)


@torch.no_grad()
def extract_features(
    model: Any, processor: Any, scenes: list[Scene], per_patch: bool, batch_size: int, device: str
) -> dict[str, torch.Tensor]:
    """Feature name -> (n_scenes, dim): every encoder hidden state and the connector, mean-pooled over the
    image tokens (`/mean`) and flattened per patch (`/patch`) where that fits PER_PATCH_MAX_DIM."""
    config = model.config
    side = image_side(model, processor)
    drop_cls = config.vision_feature_select_strategy == "default"  # the LLM never sees CLIP's CLS token
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(scenes), batch_size):
        images = [render(scene, side) for scene in scenes[start : start + batch_size]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device, model.dtype)
        outputs = model.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            output_hidden_states=True,
        )
        states = {f"layer {i}": h[:, 1:] if drop_cls else h for i, h in enumerate(outputs.hidden_states)}
        states[CONNECTOR] = torch.stack(list(outputs.pooler_output))
        for name, tokens in states.items():
            tokens = tokens.float().cpu()
            chunks.setdefault(f"{name}/mean", []).append(tokens.mean(1))
            if per_patch and tokens.shape[1] * tokens.shape[2] <= PER_PATCH_MAX_DIM:
                chunks.setdefault(f"{name}/patch", []).append(tokens.flatten(1))
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def label_tensors(scenes_by_split: dict[str, dict[str, list[Scene]]]) -> dict[str, dict[str, torch.Tensor]]:
    """attribute -> split -> class indices (classes numbered by their sorted names, shared by both splits)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for attribute, (kind, read) in ATTRIBUTES.items():
        names = {split: [read(s) for s in sets[kind]] for split, sets in scenes_by_split.items()}
        classes = sorted({n for labels in names.values() for n in labels})
        out[attribute] = {split: torch.tensor([classes.index(n) for n in labels]) for split, labels in names.items()}
    return out


def probe_model(
    model_path: str | Path, out_dir: str | Path, config: ProbeConfig = ProbeConfig(), device: str | None = None
) -> dict[str, Any]:
    """Probe a stripped model (or a run, stripped on the fly); write probe.json/.md/.png into `out_dir`."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from dsvlm.evaluation.model_dir import resolve_model
    from dsvlm.strip.strip import stripped_model

    path = resolve_model(stripped_model(Path(model_path)))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = LlavaForConditionalGeneration.from_pretrained(path).to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    sizes = {"train": config.n_train, "test": config.n_test}
    scenes = {split: {kind: probe_scenes(split, n, kind) for kind in ("single", "multi")} for split, n in sizes.items()}
    features = {
        split: {
            kind: extract_features(model, processor, kind_scenes, config.per_patch, config.batch_size, device)
            for kind, kind_scenes in sets.items()
        }
        for split, sets in scenes.items()
    }
    labels = label_tensors(scenes)
    accuracy: dict[str, dict[str, float]] = {}
    for name in features["train"]["single"]:
        accuracy[name] = {}
        for attribute, (kind, _) in ATTRIBUTES.items():
            accuracy[name][attribute] = round(
                fit_probe(
                    features["train"][kind][name],
                    labels[attribute]["train"],
                    features["test"][kind][name],
                    labels[attribute]["test"],
                    steps=config.steps,
                    l2=config.l2,
                    seed=config.seed,
                ),
                4,
            )
        log.info("probe %s: %s", name, "  ".join(f"{a} {v:.3f}" for a, v in accuracy[name].items()))
    result = {
        "model": str(path),
        "config": asdict(config),
        "attributes": list(ATTRIBUTES),
        "chance": {a: round(chance_level(labels[a]["test"]), 4) for a in ATTRIBUTES},
        "accuracy": accuracy,
    }
    write_outputs(result, Path(out_dir))
    return result


def mean_accuracy(result: dict[str, Any]) -> float:
    """One number per model: the mean test accuracy over every (feature, attribute) probe."""
    values = [v for row in result["accuracy"].values() for v in row.values()]
    return sum(values) / len(values)


def table(result: dict[str, Any]) -> str:
    """The accuracies as a markdown table, the chance levels as the last row."""
    attributes = result["attributes"]
    lines = ["| features | " + " | ".join(attributes) + " |", "|---" * (len(attributes) + 1) + "|"]
    for name, row in result["accuracy"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[a]:.3f}" for a in attributes) + " |")
    lines.append("| chance | " + " | ".join(f"{result['chance'][a]:.3f}" for a in attributes) + " |")
    return "\n".join(lines) + "\n"


def heatmap(result: dict[str, Any], out: Path, title: str) -> None:
    """Feature x attribute accuracy as an annotated heat map PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attributes = result["attributes"]
    rows = list(result["accuracy"])
    values = [[result["accuracy"][r][a] for a in attributes] for r in rows]
    fig, ax = plt.subplots(figsize=(1.3 * len(attributes) + 2.5, 0.4 * len(rows) + 1.5))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(attributes)), [f"{a}\n(chance {result['chance'][a]:.2f})" for a in attributes])
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=8
            )
    fig.colorbar(image, ax=ax, label="held-out accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    heatmap(result, out / PROBE_PLOT, f"linear probes: {result['model'][-60:]}")
    atomic_write_text(out / PROBE_TABLE, table(result))
    atomic_write_json(out / PROBE_JSON, result)  # last: its presence means the probe is complete
