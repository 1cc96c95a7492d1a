"""The `--overwrite` guard every command shares: dsvlm replaces only what it wrote itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsvlm.errors import DsvlmError
from dsvlm.outputs import DATASET, RUN, STRIPPED_MODEL, check_output, write_marker


def precious(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "thesis.tex").write_text("years of work")
    return directory


def test_missing_or_empty_output_needs_nothing(tmp_path):
    check_output(tmp_path / "new", RUN, overwrite=False)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", STRIPPED_MODEL, overwrite=False)


def test_non_empty_output_needs_overwrite_and_the_marker_of_its_kind(tmp_path):
    out = precious(tmp_path / "out")
    with pytest.raises(DsvlmError, match="already exists; pass --overwrite"):
        check_output(out, RUN, overwrite=False)
    for kind in (RUN, STRIPPED_MODEL, DATASET):
        with pytest.raises(DsvlmError, match=f"not a {kind.name} written by dsvlm"):
            check_output(out, kind, overwrite=True)
    write_marker(out, RUN)
    check_output(out, RUN, overwrite=True)
    with pytest.raises(DsvlmError, match="not a stripped model"):  # a run is not a model to replace
        check_output(out, STRIPPED_MODEL, overwrite=True)


def test_files_and_symlinks_are_never_replaced(tmp_path):
    (tmp_path / "file").write_text("x")
    target = precious(tmp_path / "target")
    write_marker(target, RUN)
    (tmp_path / "link").symlink_to(target)
    for out in (tmp_path / "file", tmp_path / "link"):
        with pytest.raises(DsvlmError, match="a file or a symlink"):
            check_output(out, RUN, overwrite=True)


@pytest.mark.parametrize("which", ["root", "home", "home-parent", "cwd", "cwd-parent"])
def test_root_home_and_current_directory_are_never_replaced(tmp_path, monkeypatch, which):
    home = precious(tmp_path / "users" / "me")
    work = precious(tmp_path / "work" / "project")
    for directory in (home, work, home.parent, work.parent):
        write_marker(directory, RUN)  # even a marker does not make them replaceable
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    out = {"root": Path("/"), "home": Path("~"), "home-parent": home.parent, "cwd": Path("."),
           "cwd-parent": Path("..")}[which]
    with pytest.raises(DsvlmError, match="refusing to replace"):
        check_output(out, RUN, overwrite=True)


@pytest.mark.parametrize("out", ["run", "run/align", "run/align/final", "."])
def test_an_output_related_to_a_source_is_refused_even_when_empty(tmp_path, out):
    source = tmp_path / "run" / "align" / "final"
    source.mkdir(parents=True)
    with pytest.raises(DsvlmError, match="lies inside the input"):
        check_output(tmp_path / out, STRIPPED_MODEL, overwrite=True, sources=[tmp_path / "run"])
