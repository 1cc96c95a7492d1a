"""Image-file checks, run in worker processes: this module imports only PIL so workers start fast."""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from collections.abc import Iterator
from typing import NamedTuple

from PIL import Image, ImageFile


class ImageCheck(NamedTuple):
    """Outcome of checking one image: reason is None for a good image."""

    reason: str | None
    detail: str
    width: int | None
    height: int | None


def _bad(reason: str, detail: str) -> ImageCheck:
    return ImageCheck(reason, detail, None, None)


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_image(root: str, rel: str, dirs: dict[str, str] | None = None) -> ImageCheck:
    """Check `rel` under the already-resolved image root: inside the root, present, non-empty, decodable.

    `dirs` caches resolved parent directories across calls (images share folders): resolving every path
    component of every image would cost as much as decoding a small image.
    """
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or os.path.splitdrive(rel)[0]:
        return _bad("path_escape", f"absolute path {rel!r}; image paths must be relative to the image root")
    if ".." in rel.replace("\\", "/").split("/"):
        return _bad("path_escape", f"{rel!r} contains '..'; image paths must stay inside the image root")
    shown = os.path.join(root, rel)
    parent, name = os.path.split(rel)
    real_parent = dirs.get(parent) if dirs is not None else None
    if real_parent is None:
        real_parent = os.path.realpath(os.path.join(root, parent))
        if dirs is not None:
            dirs[parent] = real_parent
    real = os.path.join(real_parent, name)
    try:
        info = os.lstat(real)
        if stat.S_ISLNK(info.st_mode):
            real = os.path.realpath(real)
            info = os.stat(real)
    except FileNotFoundError:
        if not _inside(root, real_parent):
            return _bad("path_escape", f"{rel!r} resolves to {real}, outside the image root (symlink?)")
        return _bad("image_missing", f"{shown} does not exist")
    except OSError as exc:
        return _bad("image_missing", f"{shown}: {exc.strerror}")
    if not _inside(root, real):
        return _bad("path_escape", f"{rel!r} resolves to {real}, outside the image root (symlink?)")
    if not stat.S_ISREG(info.st_mode):
        return _bad("image_missing", f"{shown} is not a file")
    if info.st_size == 0:
        return _bad("image_empty", f"{shown} is 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's per-file warnings (EXIF, palette) would flood the log
            # verify() checks the container (PNG CRCs) without decoding; load() decodes the pixels and is what
            # catches truncated files. verify() leaves the file unusable, hence the second open.
            with Image.open(real) as image:
                image.verify()
            with Image.open(real) as image:
                image.load()
                width, height = image.size
    except Exception as exc:  # any decoder failure (OSError, SyntaxError, ValueError, bomb...) = corrupt
        return _bad("image_corrupt", f"{shown}: {type(exc).__name__}: {exc}")
    if width == 0 or height == 0:
        return _bad("image_empty", f"{shown} has size {width}x{height}")
    return ImageCheck(None, "", width, height)


def check_images(root: str, rels: list[str]) -> list[ImageCheck]:
    """Check a chunk of images (one task of the process pool)."""
    dirs: dict[str, str] = {}
    with strict_truncation():
        return [check_image(root, rel, dirs) for rel in rels]


@contextlib.contextmanager
def strict_truncation() -> Iterator[None]:
    """A cut image file is an error inside this block: lmms-eval, once imported, lets PIL pad truncated images
    with grey (`ImageFile.LOAD_TRUNCATED_IMAGES`), process-wide."""
    truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
