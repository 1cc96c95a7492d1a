"""What a command may do to its output directory: the one `--overwrite` guard that `prepare`, `train` and
`strip` share. dsvlm replaces only what it wrote itself: an output carries a marker file of its kind."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dsvlm.errors import DsvlmError


@dataclass(frozen=True)
class OutputKind:
    name: str  # for messages: "prepared dataset"
    marker: str  # a file that only dsvlm writes into this kind of output


DATASET = OutputKind("prepared dataset", "manifest.json")
RUN = OutputKind("training run", ".dsvlm-run")
STRIPPED_MODEL = OutputKind("stripped model", ".dsvlm-model")


def write_marker(directory: Path, kind: OutputKind) -> None:
    """Mark `directory` as a `kind` output that a later `--overwrite` may replace."""
    (Path(directory) / kind.marker).write_text(f"written by dsvlm: a {kind.name} that --overwrite may replace\n")


def _encloses(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output(out: Path, kind: OutputKind, overwrite: bool, sources: Iterable[Path] = ()) -> None:
    """Raise unless writing `out` can delete nothing that dsvlm did not write.

    A missing or empty `out` is fine. A non-empty one needs `overwrite`, and even then only an earlier output
    of the same kind (its marker) is replaced; never `/`, a directory holding the home or current directory,
    or a directory that is, holds or lies inside one of the command's `sources`.
    """
    out = Path(out).expanduser()
    resolved = out.resolve()
    for source in sources:
        source = Path(source).expanduser().resolve()
        if _encloses(resolved, source) or _encloses(source, resolved):
            raise DsvlmError(f"{out} is, holds or lies inside the input {source}; choose an output elsewhere")
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise DsvlmError(f"{out} exists and is a file or a symlink, not a {kind.name} directory; remove it yourself")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise DsvlmError(f"{out} already exists; pass --overwrite to replace it")
    for protected in (Path("/"), Path.home().resolve(), Path.cwd().resolve()):
        if _encloses(resolved, protected):
            raise DsvlmError(f"refusing to replace {out}: it is or holds {protected}; choose another output")
    if not (out / kind.marker).is_file():
        raise DsvlmError(f"{out} exists and is not a {kind.name} written by dsvlm (no {kind.marker}); refusing to "
                         "replace it: choose another output or remove it yourself")
