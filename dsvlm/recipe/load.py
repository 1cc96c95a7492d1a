"""Load a recipe (bundled name or path), apply `key.sub=value` overrides, validate with clear messages."""

from __future__ import annotations

import contextlib
import difflib
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dsvlm.errors import RecipeError, brief, shorten
from dsvlm.recipe.schema import Recipe

log = logging.getLogger(__name__)
# A bundled recipe is a few hundred YAML nodes; aliases (`*name`) may repeat a node, but a file whose aliases
# expand past this many nodes ("billion laughs") would exhaust memory in validation, so it is refused.
MAX_YAML_NODES = 100_000


def recipes_dir() -> Path:
    """The bundled recipes: package data `dsvlm/recipes` (in a checkout, a symlink to the top-level `recipes/`).

    A real directory wherever dsvlm is installed (wheels install unzipped), so recipes stay plain paths that
    `accelerate launch --config_file` and `dsvlm recipe cp` can use.
    """
    bundled = resources.files("dsvlm") / "recipes"
    if not isinstance(bundled, Path) or not bundled.is_dir():
        raise RecipeError(f"the bundled recipes were not found at {bundled}; reinstall dsvlm")
    return bundled


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
    bundled = recipes_dir() / f"{name_or_path}.yaml"
    with contextlib.suppress(OSError, ValueError):  # a name too long for a path, a NUL: not a recipe either way
        if path.is_file():
            return path
        if bundled.is_file():
            return bundled
    names = list(bundled_recipes())
    hint = difflib.get_close_matches(name_or_path, names, n=1)
    raise RecipeError(
        f"recipe {brief(name_or_path)} is neither a file nor a bundled recipe"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f"; bundled: {', '.join(names)}"
    )


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a YAML graph whose aliases expand to more than MAX_YAML_NODES nodes or refer to themselves.
    Sizes are counted once per node (memoised, iteratively): the check costs the file's size, not the expansion."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # the nodes on the current path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_YAML_NODES:
                line = node.start_mark.line + 1
                raise RecipeError(
                    f"{source}: the YAML aliases at line {line} expand to more than {MAX_YAML_NODES} "
                    "values; a recipe is small: write its values out"
                )
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise RecipeError(f"{source}: a YAML alias refers to itself (line {node.start_mark.line + 1})")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))


def load_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load` with alias expansion bounded (MAX_YAML_NODES) and deep nesting refused cleanly."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise RecipeError(f"{source}: YAML nested too deeply to be a recipe") from None
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = load_yaml(path.read_text(encoding="utf-8-sig"), str(path))  # -sig: a BOM (Windows editors) is fine
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
        raise RecipeError(f"override {brief(override)} must look like key.sub=value")
    try:
        value = load_yaml(raw, f"override {brief(key)}") if raw else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {brief(override)}: value is not valid YAML") from exc
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
        raise RecipeError(f"override {brief(key)}: {brief('.'.join(parts[:-1]))} is a value, not a section")


def _index(node: list, part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"override {brief(path)}: {brief(part)} is not an index of a list of {len(node)}")
    return int(part)


def _child(node: Any, part: str, path: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if not isinstance(node, dict):
        raise RecipeError(f"override {brief(path)}: the parent is a value, not a section")
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
    log.warning(
        "model.trust_remote_code is on: code from %s will run on this machine when they load",
        ", ".join(repos) or "(no pretrained repository: nothing)",
    )
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
        path = ".".join(shorten(part, 40) for part in loc) or "(root)"  # user keys: any length
        if err["type"] == "extra_forbidden":
            known = _known_fields(loc[:-1])
            hint = difflib.get_close_matches(loc[-1], known, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(known)}"
            lines.append(f"  {path}: unknown key{suggestion}")
            continue
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {brief(value)})"
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
