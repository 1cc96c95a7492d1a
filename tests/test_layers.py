"""The package's layers point down (docs/architecture.md): every `import dsvlm...` in dsvlm/, at module level or
inside a function, targets a lower layer or its own package."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dsvlm"

# Lowest first. A module may import its own package (dsvlm.X.*) and anything in a lower layer.
LAYERS: list[set[str]] = [
    {"dsvlm", "dsvlm.errors"},
    {"dsvlm.console", "dsvlm.io"},
    {"dsvlm.outputs"},
    {"dsvlm.recipe"},
    {"dsvlm.data", "dsvlm.model"},
    {"dsvlm.rundir", "dsvlm.plots"},
    {"dsvlm.train", "dsvlm.strip", "dsvlm.evaluation", "dsvlm.diffusion"},
    {"dsvlm.analysis"},
    {"dsvlm.ablate"},
    {"dsvlm.cli"},
    {"dsvlm.__main__"},
]
# data and model share a layer; between them only these modules cross: the model reads image geometry, the
# latent cache encodes with the branch's own VAE formula. The model never imports data's readers or writers.
ACROSS = {
    ("dsvlm.model", "dsvlm.data"): {"dsvlm.data.geometry"},
    ("dsvlm.data", "dsvlm.model"): {"dsvlm.model.supervision.vae"},
}


def unit(module: str) -> str:
    """The layer entry a module belongs to: dsvlm.X for dsvlm.X.*, or the module itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def layer_of(module: str) -> int:
    name = unit(module)
    for rank, members in enumerate(LAYERS):
        if name in members:
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it where it belongs")


def imports() -> list[tuple[str, str, int]]:
    """(importing module, imported dsvlm module, line) for every dsvlm import in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dsvlm"):
                found.append((module, node.module, node.lineno))
            elif isinstance(node, ast.Import):
                found += [(module, alias.name, node.lineno) for alias in node.names if alias.name.startswith("dsvlm")]
    return found


def violations(found: list[tuple[str, str, int]]) -> list[str]:
    wrong = []
    for module, target, line in found:
        if unit(module) == unit(target):
            continue
        allowed = ACROSS.get((unit(module), unit(target)))
        if layer_of(target) < layer_of(module) or (allowed is not None and target in allowed):
            continue
        wrong.append(f"{module}:{line} imports {target}")
    return wrong


def test_every_import_points_down_or_stays_in_its_package():
    found = imports()
    # the walk sees imports inside functions too (the CLI imports its commands' work lazily)
    assert any(m == "dsvlm.cli.evaluate" and t == "dsvlm.strip.strip" for m, t, _ in found)
    wrong = violations(found)
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_upward_and_sideways_imports_are_caught():
    assert violations(
        [
            ("dsvlm.model.tokenizer", "dsvlm.data.synthetic", 1),
            ("dsvlm.evaluation.runner", "dsvlm.strip.strip", 2),
            ("dsvlm.train.loop", "dsvlm.cli.common", 3),
        ]
    ) == [
        "dsvlm.model.tokenizer:1 imports dsvlm.data.synthetic",
        "dsvlm.evaluation.runner:2 imports dsvlm.strip.strip",
        "dsvlm.train.loop:3 imports dsvlm.cli.common",
    ]
    assert violations([("dsvlm.data.latents", "dsvlm.model.supervision.vae", 1)]) == []
