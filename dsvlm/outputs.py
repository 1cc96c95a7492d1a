"""What a command may do to its output directory, shared by `prepare`, `pretrain-diffusion`, `train` and
`strip`: the one `--overwrite` guard (dsvlm replaces only what it wrote itself: an output carries a marker file of
its kind) and the one-writer lock."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dsvlm.errors import DsvlmError

log = logging.getLogger(__name__)
# What io.atomic_dir / atomic_write_text leave when their process is killed: `.NAME.tmp-PID`, `.NAME.old-PID`.
TEMPORARY = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")


@dataclass(frozen=True)
class OutputKind:
    name: str  # for messages: "prepared dataset"
    marker: str  # a file that only dsvlm writes into this kind of output


DATASET = OutputKind("prepared dataset", "manifest.json")
RUN = OutputKind("training run", ".dsvlm-run")
STRIPPED_MODEL = OutputKind("stripped model", ".dsvlm-model")
DIFFUSION_MODEL = OutputKind("pretrained diffusion model", ".dsvlm-diffusion")


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
        raise DsvlmError(
            f"{out} exists and is not a {kind.name} written by dsvlm (no {kind.marker}); refusing to "
            "replace it: choose another output or remove it yourself"
        )


def _holder(lock: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file; None when it is gone or unreadable."""
    try:
        pid, host = lock.read_text().split(maxsplit=1)
        return int(pid), host.strip()
    except (OSError, ValueError):
        return None


def pid_alive(pid: int, host: str | None = None) -> bool:
    """Whether process `pid` still runs. A process on another host cannot be checked: it counts as alive."""
    if host is not None and host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def lock_path(out: Path) -> Path:
    """The lock of `out` lies next to it: `out` itself may be replaced whole by a rename."""
    out = Path(out).expanduser().resolve()
    return out.with_name(f".{out.name or 'root'}.lock")


def _take(lock: Path, out: Path) -> None:
    mine = f"{os.getpid()} {socket.gethostname()}\n"
    draft = lock.with_name(f"{lock.name}.{os.getpid()}")
    draft.write_text(mine)
    try:
        for _ in range(3):
            try:
                os.link(draft, lock)  # atomic, and fails if the lock exists: the lock appears whole or not at all
                return
            except FileExistsError:
                pass
            holder = _holder(lock)
            if holder is None:
                continue  # released meanwhile
            pid, host = holder
            if pid_alive(pid, host):
                raise DsvlmError(
                    f"{out} is being written by another dsvlm process (pid {pid} on {host}); wait for "
                    f"it to finish or stop it (its lock: {lock})"
                )
            # Rename before deleting, so that of two processes reclaiming the same stale lock only one succeeds.
            stale = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(lock, stale)
                if _holder(stale) == holder:
                    log.warning("%s: removed the stale lock of process %d, which is gone", out, pid)
                else:  # a live lock taken in between: put it back
                    with contextlib.suppress(FileExistsError):
                        os.link(stale, lock)
                stale.unlink()
        raise DsvlmError(f"{out}: could not take its lock {lock}; another process keeps taking it")
    finally:
        draft.unlink(missing_ok=True)


@contextlib.contextmanager
def writer_lock(out: Path) -> Iterator[None]:
    """One writer per output: hold `.NAME.lock` (our pid) next to `out` for the block. Another live writer stops
    us at once, naming its pid; the lock of a dead process is reclaimed with a warning. Released on any exit of
    the block, Ctrl-C included. A distributed run takes it on its main process only."""
    lock = lock_path(out)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        _take(lock, Path(out))
    except OSError as exc:
        raise DsvlmError(f"cannot write to the output directory {out}: {exc.strerror or exc}") from exc
    remove_dead_temporaries(lock.parent.glob(f".{glob.escape(Path(out).expanduser().resolve().name)}.*"))
    try:
        yield
    finally:
        if _holder(lock) == (os.getpid(), socket.gethostname()):
            lock.unlink(missing_ok=True)


def remove_dead_temporaries(candidates: Iterable[Path]) -> None:
    """Remove the temporary files and directories (`.NAME.tmp-PID`, `.NAME.old-PID`) among `candidates` whose
    process is gone: a killed writer cannot clean up after itself."""
    for path in candidates:
        match = TEMPORARY.match(path.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        log.info("removing %s, left by process %s, which is gone", path, match.group(1))
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
