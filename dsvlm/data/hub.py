"""Prepare a LLaVA-format dataset straight from a Hugging Face hub dataset repo.

Downloads only the named files (and the image archive) with `snapshot_download` into a local directory, then
runs the same preparation as `dsvlm prepare llava`. Offline or unreachable hub: one immediate DataError that
says what to download elsewhere and which `dsvlm prepare llava` command to run on the copy - no retry loop.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import is_offline_mode, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from dsvlm.console import progress_bar
from dsvlm.data.common import atomic_output
from dsvlm.data.llava import prepare_into, report_empty_input
from dsvlm.errors import DataError
from dsvlm.outputs import DATASET, check_output

if TYPE_CHECKING:
    from dsvlm.data.latents import LatentRequest

try:  # huggingface_hub >= 1.0 talks httpx; older versions raise requests errors, which are OSErrors
    from httpx import TransportError as _HttpxError

    _CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, _HttpxError)
except ImportError:
    _CONNECTION_ERRORS = (OSError,)


@dataclass(frozen=True)
class HubPreset:
    """Where a known repo keeps its LLaVA files: paths inside the repo."""

    align: str | None = None
    instruct: str | None = None
    archive: str | None = None
    image_root: str | None = None


PRESETS = {
    # LCS-558K, the LLaVA-1.5 stage-1 captions; images.zip unpacks to 00000/000000012.jpg, ...
    "liuhaotian/LLaVA-Pretrain": HubPreset(align="blip_laion_cc_sbu_558k.json", archive="images.zip"),
}


def offline_message(
    repo_id: str,
    out: Path,
    files: dict[str, str],
    archive: str | None,
    image_root: str | None,
    revision: str | None,
    reason: str,
) -> str:
    """What to run instead when the hub can't be reached: download elsewhere, then `dsvlm prepare llava`."""
    local = "DIR"
    rev = f" --revision {revision}" if revision else ""
    lines = [
        f"cannot download the dataset {repo_id}: {reason}. Download it where the hub is reachable:",
        f"  hf download {repo_id} --repo-type dataset{rev} --local-dir {local}",
    ]
    if archive:
        lines.append(f"  unzip {local}/{archive} -d {local}/images")
        root = f"{local}/images"
    else:
        root = image_root if image_root and Path(image_root).is_absolute() else f"{local}/{image_root}"
    split_flags = "".join(f" --{name} {local}/{path}" for name, path in files.items())
    lines += ["then copy DIR here and prepare it:", f"  dsvlm prepare llava {out}{split_flags} --image-root {root}"]
    return "\n".join(lines)


def _extract(archive: Path, dest: Path, progress: bool) -> None:
    # ZipFile.extract drops absolute and '..' components, so members cannot land outside dest.
    with zipfile.ZipFile(archive) as zf, progress_bar(progress) as bar:
        members = zf.infolist()
        task = bar.add_task(f"extracting {archive.name}", total=len(members))
        for member in members:
            zf.extract(member, dest)
            bar.advance(task)


def _download(
    repo_id: str,
    out: Path,
    files: dict[str, str],
    archive: str | None,
    image_root: str | None,
    revision: str | None,
    download_dir: Path | None,
) -> Path:
    """Download only the named files, the archive and the repo's image folder; return the local copy.

    An offline or unreachable hub raises at once (no retry loop) with `offline_message`'s instructions.
    """
    patterns = [*files.values(), *([archive] if archive else [])]
    if image_root and not Path(image_root).is_absolute():
        patterns.append(f"{image_root.rstrip('/')}/**")
    target = Path(download_dir) if download_dir else out.with_name(f"{out.name}-hub")
    try:
        snapshot = Path(
            snapshot_download(
                repo_id, repo_type="dataset", revision=revision, local_dir=target, allow_patterns=patterns
            )
        )
    except LocalEntryNotFoundError as exc:
        # raised both in offline mode and when the hub can't be reached and nothing is cached
        reason = "offline mode (HF_HUB_OFFLINE=1)" if is_offline_mode() else f"the hub is unreachable ({exc})"
        raise DataError(offline_message(repo_id, out, files, archive, image_root, revision, reason)) from None
    except HfHubHTTPError as exc:
        raise DataError(f"{repo_id}: {str(exc).splitlines()[0]}") from None
    except _CONNECTION_ERRORS as exc:
        reason = f"the hub is unreachable ({type(exc).__name__}: {exc})"
        raise DataError(offline_message(repo_id, out, files, archive, image_root, revision, reason)) from None
    for name, path in files.items():
        if not (snapshot / path).is_file():
            raise DataError(f"{repo_id}: no file {path!r} (--{name}) in the downloaded repo {snapshot}")
    if archive and not (snapshot / archive).is_file():
        raise DataError(f"{repo_id}: no archive {archive!r} in the downloaded repo {snapshot}")
    return snapshot


def prepare_hub(
    repo_id: str,
    out: Path,
    *,
    align: str | None = None,
    instruct: str | None = None,
    archive: str | None = None,
    image_root: str | None = None,
    revision: str | None = None,
    download_dir: Path | None = None,
    strict: bool = False,
    allow_empty: bool = False,
    workers: int = 1,
    overwrite: bool = False,
    latents: LatentRequest | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Download `repo_id` (a dataset repo) and prepare it into `out`. Returns the manifest.

    align/instruct: JSON files inside the repo (known repos in PRESETS need none). Images come from `archive`
    (a zip in the repo, extracted into OUT/images) or `image_root` (a folder in the repo, or a local absolute
    path). Files go to `download_dir` (default: `<OUT>-hub` next to OUT) as plain files, not cache symlinks,
    so image paths stay inside the image root.
    """
    out = Path(out)
    preset = PRESETS.get(repo_id, HubPreset())
    files = {
        name: path
        for name, path in (("align", align or preset.align), ("instruct", instruct or preset.instruct))
        if path
    }
    archive = archive or preset.archive
    image_root = image_root or preset.image_root
    if not files:
        raise DataError(
            f"{repo_id}: name the file(s) to prepare with --align FILE and/or --instruct FILE (paths inside the repo)"
        )
    if archive is None and image_root is None:
        raise DataError(
            f"{repo_id}: say where the images are: --archive FILE.zip (in the repo; extracted into "
            "OUT/images) or --image-root DIR (a folder in the repo, or a local absolute path)"
        )
    check_output(out, DATASET, overwrite)  # before a long download, not after it

    snapshot = _download(repo_id, out, files, archive, image_root, revision, download_dir)
    options = {
        "repo_id": repo_id,
        "revision": revision,
        "files": files,
        "archive": archive,
        "image_root": image_root,
        "download_dir": str(snapshot.resolve()),
        "strict": strict,
        "allow_empty": allow_empty,
        "workers": workers,
    }
    with report_empty_input(out), atomic_output(out, overwrite) as tmp:
        if archive:
            _extract(snapshot / archive, tmp / "images", progress)
            root, shown_root = tmp / "images", "images"
        else:
            root = Path(image_root) if Path(image_root).is_absolute() else snapshot / image_root
            shown_root = str(root.resolve())
        return prepare_into(
            tmp,
            {name: snapshot / path for name, path in files.items()},
            root,
            manifest_image_root=shown_root,
            kind="hub",
            options=options,
            strict=strict,
            allow_empty=allow_empty,
            workers=workers,
            progress=progress,
            latents=latents,
        )
