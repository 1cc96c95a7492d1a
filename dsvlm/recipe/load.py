"""Load a recipe (bundled name or path), apply `key.sub=value` overrides, validate with clear messages."""

from __future__ import annotations

import difflib
import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dsvlm.errors import RecipeError
from dsvlm.recipe.schema import Recipe

log = logging.getLogger(__name__)

def recipes_dir() -> Path:
    """The bundled recipes: `recipes/` of a source checkout, or `share/dsvlm/recipes` of an install."""
    for candidate in (Path(__file__).resolve().parents[2] / "recipes", Path(sys.prefix) / "share/dsvlm/recipes"):
        if candidate.is_dir():
            return candidate
    raise RecipeError("the bundled recipes were not found; reinstall dsvlm")


def bundled_recipes() -> dict[str, str]:
    """Name -> one-line description of every bundled recipe."""
    out = {}
    for path in sorted(recipes_dir().glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        out[path.stem] = str(data.get("description", ""))
    return out


def recipe_path(name_or_path: str) -> Path:
    """Resolve a bundled recipe name or a file path."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = recipes_dir() / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    names = list(bundled_recipes())
    hint = difflib.get_close_matches(name_or_path, names, n=1)
    raise RecipeError(
        f"recipe {name_or_path!r} is neither a file nor a bundled recipe"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f"; bundled: {', '.join(names)}"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))  # -sig: a BOM (Windows editors) is fine
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise RecipeError(f"{path}: malformed YAML at {where}: {exc.problem}") from exc
    except yaml.YAMLError as exc:  # the reader's errors: a NUL or another character YAML does not allow
        raise RecipeError(f"{path}: not a YAML text file: {str(exc).splitlines()[0][:200]}") from exc
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); a recipe is a UTF-8 YAML file") from exc
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc.strerror}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (`true`, `3e-4`, `[8, 16]`)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {override!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {override!r}: value is not valid YAML") from exc
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]))
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"override {key!r}: {'.'.join(parts[:-1])} is a value, not a section")


def _index(node: list, part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"override {path!r}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def _child(node: Any, part: str, path: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if not isinstance(node, dict):
        raise RecipeError(f"override {path!r}: the parent is a value, not a section")
    if part not in node or node[part] is None:
        node[part] = {}
    return node[part]


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError with the field path and bad value."""
    path = recipe_path(name_or_path)
    data = read_yaml(path)
    for override in overrides:
        apply_override(data, override)
    return validate_recipe(data, source=str(path))


def warn_remote_code(recipe: Recipe) -> list[str]:
    """With `model.trust_remote_code`, warn naming the repositories whose code will run; returns them."""
    model = recipe.model
    if not model.trust_remote_code:
        return []
    repos = list(dict.fromkeys(r for r in (model.vision.pretrained, model.llm.pretrained, model.llm.tokenizer) if r))
    log.warning("model.trust_remote_code is on: code from %s will run on this machine when they load",
                ", ".join(repos) or "(no pretrained repository: nothing)")
    return repos


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: invalid recipe\n" + format_errors(exc, data)) from exc


def format_errors(exc: ValidationError, data: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join(loc) or "(root)"
        if err["type"] == "extra_forbidden":
            known = _known_fields(loc[:-1])
            hint = difflib.get_close_matches(loc[-1], known, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(known)}"
            lines.append(f"  {path}: unknown key{suggestion}")
            continue
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {path}: {err['msg']}{shown}")
    return "\n".join(lines)


def _known_fields(loc: list[str]) -> list[str]:
    """Field names of the sub-model at `loc` (list indices skipped)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        inner = getattr(annotation, "__args__", (annotation,))
        sub = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what a run directory stores)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
