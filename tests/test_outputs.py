"""What every command may do to its output: the `--overwrite` guard (dsvlm replaces only what it wrote itself)
and the one-writer lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsvlm.cli.app import app
from dsvlm.errors import DsvlmError
from dsvlm.outputs import DATASET, RUN, STRIPPED_MODEL, check_output, lock_path, write_marker, writer_lock


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


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("tiny") / "data"
    prepared = CliRunner().invoke(
        app, ["prepare", "synthetic", str(data), "--n-align", "8", "--n-instruct", "8", "--n-eval", "4"]
    )
    assert prepared.exit_code == 0, prepared.output
    return data


@pytest.mark.parametrize("flags", [[], ["--resume"], ["--overwrite"], ["--resume", "--overwrite"]])
def test_train_never_writes_into_a_folder_that_is_not_a_run(tmp_path, tiny_data, flags):
    out = precious(tmp_path / "out")
    result = CliRunner().invoke(
        app, ["train", "tiny-synthetic", f"data.dataset={tiny_data}", f"run.output_dir={out}", *flags]
    )
    assert result.exit_code == 2, result.output
    assert "not a dsvlm run" in result.stderr or "not a training run written by dsvlm" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


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
    out = {
        "root": Path("/"),
        "home": Path("~"),
        "home-parent": home.parent,
        "cwd": Path("."),
        "cwd-parent": Path(".."),
    }[which]
    with pytest.raises(DsvlmError, match="refusing to replace"):
        check_output(out, RUN, overwrite=True)


@pytest.mark.parametrize("out", ["run", "run/align", "run/align/final", "."])
def test_an_output_related_to_a_source_is_refused_even_when_empty(tmp_path, out):
    source = tmp_path / "run" / "align" / "final"
    source.mkdir(parents=True)
    with pytest.raises(DsvlmError, match="lies inside the input"):
        check_output(tmp_path / out, STRIPPED_MODEL, overwrite=True, sources=[tmp_path / "run"])


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def plant_lock(out: Path, pid: int) -> Path:
    lock = lock_path(out)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(f"{pid} {socket.gethostname()}\n")
    return lock


def test_a_live_writer_stops_a_second_one_at_once(tmp_path):
    lock = plant_lock(tmp_path / "out", os.getppid())
    expected = f"being written by another dsvlm process \\(pid {os.getppid()}"
    with pytest.raises(DsvlmError, match=expected), writer_lock(tmp_path / "out"):
        pytest.fail("the block must not run")
    assert lock.read_text().startswith(f"{os.getppid()} ")  # the other writer's lock is untouched


def test_a_stale_lock_is_reclaimed_with_a_warning_and_released(tmp_path, caplog):
    pid = dead_pid()
    lock = plant_lock(tmp_path / "out", pid)
    with writer_lock(tmp_path / "out"):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert f"stale lock of process {pid}" in caplog.text
    assert not lock.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no drafts or stale copies left behind


def test_the_lock_is_released_on_ctrl_c(tmp_path):
    with pytest.raises(KeyboardInterrupt), writer_lock(tmp_path / "out"):
        raise KeyboardInterrupt
    assert not lock_path(tmp_path / "out").exists()


HOLD = """
import signal
import sys
from dsvlm.outputs import writer_lock
signal.signal(signal.SIGINT, signal.default_int_handler)  # a pytest-xdist worker's children inherit SIGINT ignored
with writer_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_prepare_stops_while_another_process_writes_and_goes_on_after_its_ctrl_c(tmp_path):
    out = tmp_path / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        args = ["prepare", "synthetic", str(out), "--n-align", "4", "--n-instruct", "4", "--n-eval", "4"]
        second = CliRunner().invoke(app, args)
        assert second.exit_code == 2 and f"pid {holder.pid}" in second.stderr
        assert not out.exists()
        holder.send_signal(signal.SIGINT)
        holder.wait(timeout=60)
    finally:
        holder.kill()
    assert not lock_path(out).exists()  # released by the interrupted process itself
    assert CliRunner().invoke(app, args).exit_code == 0
