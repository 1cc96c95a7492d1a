"""The schema of a prepared dataset's manifest.json and of its latent cache's index.json: a reader checks them
rather than trusting them (a hand-edited or foreign file is one clean error naming the field), and every path
they name must stay inside the dataset (images: inside the declared image root, checked per record)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from dsvlm.errors import DataError, brief, shorten


def _relative(path: str) -> str:
    """A path inside the directory that names it: relative, no '..', no NUL."""
    if not path or "\x00" in path:
        raise ValueError("must be a non-empty path without NUL")
    parts = PurePosixPath(path.replace("\\", "/"))
    if parts.is_absolute() or Path(path).is_absolute() or ".." in parts.parts:
        raise ValueError("must be a path relative to the dataset, without '..'")
    return path


RelativePath = Annotated[str, AfterValidator(_relative)]
Count = Annotated[int, Field(ge=0)]


class _Checked(BaseModel):
    # Unknown keys are kept (a later dsvlm may add some); known ones must have their type.
    model_config = ConfigDict(extra="allow", strict=True)


class Source(_Checked):
    path: str
    sha256: str


class Split(_Checked):
    file: RelativePath
    records: Count
    skipped: dict[str, Count] = {}
    source: Source | None = None


class LatentsEntry(_Checked):
    dir: RelativePath
    fingerprint: str
    resolution: Annotated[int, Field(gt=0)]
    geometry: str
    shape: list[Annotated[int, Field(gt=0)]] | None
    images: Count


class Manifest(_Checked):
    """What readers use is required; what only informs (version, date, options, sources) is checked if present."""

    format_version: int
    kind: str
    image_root: Annotated[str, Field(min_length=1, pattern=r"^[^\x00]*$")]
    splits: dict[str, Split]
    dsvlm_version: str | None = None
    created: str | None = None
    options: dict[str, Any] = {}
    eval: dict[str, RelativePath] = {}
    latents: LatentsEntry | None = None


class LatentIndex(_Checked):
    version: int
    fingerprint: str
    resolution: Annotated[int, Field(gt=0)]
    geometry: str
    shape: list[Annotated[int, Field(gt=0)]] | None
    scaling_factor: float
    shards: list[RelativePath]  # the per-image lookup is in images.arrow, checked by LatentCache.open


def _problems(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors()[:5]:
        where = ".".join(shorten(str(part), 40) for part in err["loc"])
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {brief(got)})"
        lines.append(f"{where or '(root)'}: {err['msg']}{shown}")
    more = len(exc.errors()) - len(lines)
    return "; ".join(lines) + (f"; and {more} more" if more > 0 else "")


def check_schema(model: type[_Checked], data: Any, source: Path, hint: str) -> Any:
    """Validate `data` (read from `source`) against `model`; DataError naming each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise DataError(f"{source}: not a valid {model.__name__} ({_problems(exc)}); {hint}") from None


def check_inside(directory: Path, rel: str, source: Path, field: str, hint: str) -> Path:
    """`directory / rel`, refusing a path that resolves (symlinks too) outside `directory`."""
    path = directory / rel
    if not path.resolve().is_relative_to(directory.resolve()):
        raise DataError(f"{source}: {field} {brief(rel)} resolves to {path.resolve()}, outside {directory}; {hint}")
    return path


def validate_manifest(data: Any, dataset: Path, hint: str) -> Manifest:
    """The manifest of the dataset at `dataset`, checked: its schema, and every file it names inside `dataset`
    (a relative image root too; an absolute one is where the dataset declares its images are)."""
    source = dataset / "manifest.json"
    manifest: Manifest = check_schema(Manifest, data, source, hint)
    for name, split in manifest.splits.items():
        check_inside(dataset, split.file, source, f"splits.{shorten(name, 40)}.file", hint)
    for name, rel in manifest.eval.items():
        check_inside(dataset, rel, source, f"eval.{shorten(name, 40)}", hint)
    if manifest.latents is not None:
        check_inside(dataset, manifest.latents.dir, source, "latents.dir", hint)
    if not Path(manifest.image_root).is_absolute():
        _relative_root(manifest.image_root, source, hint)
        check_inside(dataset, manifest.image_root, source, "image_root", hint)
    return manifest


def _relative_root(root: str, source: Path, hint: str) -> None:
    try:
        _relative(root)
    except ValueError as exc:
        raise DataError(f"{source}: image_root {brief(root)} {exc}; {hint}") from None
