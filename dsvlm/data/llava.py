"""Validate and prepare LLaVA-format data (LCS-558K caption style and mix-665K multi-turn style).

Input: a JSON list or JSONL of `{"id", "image" (relative to the image root; absent for text-only records),
"conversations": [{"from": "human"|"gpt", "value"}]}`. Every record is checked; bad ones are skipped and
reported (skipped.jsonl + counts in the manifest), or with strict=True the first one stops the run.
Every writer of prepared datasets (synthetic, hub) goes through `prepare_into`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.table import Table

from dsvlm import __version__
from dsvlm.console import progress_bar
from dsvlm.data.common import (
    FORMAT_VERSION,
    IMAGE_TOKEN,
    MANIFEST,
    PARQUET_SCHEMA,
    SKIPPED,
    SPLIT_NAME,
    atomic_output,
    now_iso,
    sha256_file,
    word_length,
)
from dsvlm.data.images import ImageCheck, check_images
from dsvlm.data.prepared import write_arrow_copy
from dsvlm.errors import DataError, brief, shorten
from dsvlm.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from rich.progress import Progress

    from dsvlm.data.latents import LatentRequest

log = logging.getLogger(__name__)

MAX_RECORD_CHARS = 1 << 20  # a record this long would not fit any model's context; parsing it is wasted memory
# Why a record is skipped; the keys are the `reason` values of skipped.jsonl and the manifest.
REASONS = {
    "malformed_json": "a JSONL line that is not valid JSON",
    "too_deep": "a record nested too deeply for the JSON parser",
    "too_large": f"a record over {MAX_RECORD_CHARS} characters (longer than any model's context)",
    "not_an_object": "a record that is not a JSON object",
    "missing_id": "no `id` (or not a string/integer)",
    "duplicate_id": "an `id` already used earlier in the split",
    "empty_conversations": "`conversations` missing, not a list, or empty",
    "bad_turn": "a turn that is not {from: human|gpt, value: string}",
    "turn_order": "turns do not alternate human, gpt, starting with human and ending with gpt",
    "bad_image_path": "`image` present but not a non-empty string",
    "image_token_missing": "a record with an image whose first human turn has no <image>",
    "image_token_repeated": "more than one <image> in a record",
    "image_token_unexpected": "<image> in a text-only record",
    "path_escape": "an image path outside the image root (absolute, '..', symlink out)",
    "image_missing": "the image file does not exist",
    "image_empty": "a 0-byte file or a 0-pixel image",
    "image_corrupt": "an image PIL cannot open, verify and decode (truncated, not an image)",
}

_CHUNK = 128  # images per process-pool task: big enough to amortise pickling, small enough for a smooth bar
_WHITESPACE = re.compile(r"\s*")


@dataclass(frozen=True)
class Record:
    """A structurally valid record (images not yet checked)."""

    index: int  # position in the input, from 0, counting every record (bad ones too)
    line: int
    id: str
    image: str | None
    conversations: list[dict[str, str]]


@dataclass(frozen=True)
class Skip:
    """One skipped record, as written to skipped.jsonl."""

    split: str
    source: str
    index: int  # position in the input, from 0 (`jq '.[index]'` of a JSON list)
    line: int  # the line of a JSONL record; a JSON list record's first line
    id: str | None
    reason: str
    detail: str

    def message(self) -> str:
        ident = f" (id {shorten(self.id)})" if self.id is not None else ""
        return f"{self.source}: record index {self.index}, line {self.line}{ident}: {self.reason}: {self.detail}"


class EmptyInputError(DataError):
    """An input that kept no record (empty, or every record skipped); carries the skips for the report."""

    def __init__(self, message: str, skips: list[Skip]) -> None:
        super().__init__(message)
        self.skips = skips


@dataclass(frozen=True)
class _Malformed:
    """A record that could not be parsed (reason: malformed_json, too_deep or too_large)."""

    reason: str
    detail: str


# --------------------------------------------------------------------------------------------- reading


def read_source(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line, parsed record) from a JSON list or JSONL file; a bad JSONL line yields a _Malformed.

    A malformed JSON *list* raises DataError naming the line: past a syntax error its records cannot be
    told apart, so there is nothing to skip to.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading BOM is not part of the JSON
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); expected a JSON list or JSONL") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    start = _WHITESPACE.match(text).end()
    if text.startswith("[", start):
        return _read_json_list(path, text, start)
    return _read_jsonl(path, text)


def _position(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    return f"line {line}, column {column}"


def _read_json_list(path: Path, text: str, start: int) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, start + 1).end()
    line, counted = 1, 0
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            line += text.count("\n", counted, pos)
            counted = pos
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg} "
                    "(a JSON list cannot be repaired record by record: fix it, or use JSONL)"
                ) from None
            except (RecursionError, MemoryError) as exc:
                end = _value_end(path, text, pos)
                obj = _unparsable(exc, end - pos)
            if not isinstance(obj, _Malformed) and end - pos > MAX_RECORD_CHARS:
                obj = _unparsable(MemoryError(), end - pos)
            yield line, obj
            pos = _WHITESPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _WHITESPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise DataError(f"{path}: malformed JSON at {_position(text, pos)}: expected ',' or ']'")
    if _WHITESPACE.match(text, pos).end() != len(text):
        raise DataError(f"{path}: malformed JSON at {_position(text, pos)}: data after the closing ']'")


_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _value_end(path: Path, text: str, pos: int) -> int:
    """Where the JSON value starting at `pos` ends, found by matching brackets outside strings: a record too deep
    or too big to parse can still be stepped over."""
    depth = 0
    for token in _JSON_TOKEN.finditer(text, pos):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(token.group(), 0)
        if depth == 0:
            return token.end()
    raise DataError(f"{path}: malformed JSON at {_position(text, pos)}: a record that never ends")


def _unparsable(exc: BaseException, size: int) -> _Malformed:
    if isinstance(exc, RecursionError):
        return _Malformed("too_deep", "nested deeper than the JSON parser goes (a real record is a few levels)")
    return _Malformed("too_large", f"{size} characters; records over {MAX_RECORD_CHARS} are skipped")


def _read_jsonl(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    lines = text.split("\n")
    first = next((raw for raw in lines if raw.strip()), "")
    # A pretty-printed single object starts with a '{' line that is not JSON on its own.
    if first.lstrip().startswith("{") and _json_or_none(first) is None and isinstance(_json_or_none(text), dict):
        raise DataError(f"{path}: a single JSON object; expected a JSON list of records or JSONL")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        if len(raw) > MAX_RECORD_CHARS:
            yield number, _unparsable(MemoryError(), len(raw))
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as exc:
            yield number, _Malformed("malformed_json", f"column {exc.colno}: {exc.msg}")
        except (RecursionError, MemoryError) as exc:
            yield number, _unparsable(exc, len(raw))


def _json_or_none(raw: str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError, MemoryError):
        return None


# ------------------------------------------------------------------------------------------- checking


def check_record(obj: Any, index: int, line: int) -> Record | tuple[str, str, str | None]:
    """Structural checks of one parsed record: a Record, or (reason, detail, id) when it is bad."""
    if isinstance(obj, _Malformed):
        return obj.reason, obj.detail, None
    if not isinstance(obj, dict):
        return "not_an_object", f"expected a JSON object, got {type(obj).__name__}", None
    raw_id = obj.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
        return "missing_id", f"`id` must be a non-empty string or integer, got {brief(raw_id)}", None
    rid = str(raw_id)
    conversations = obj.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        what = "missing" if conversations is None else f"{type(conversations).__name__} {brief(conversations, 40)}"
        return "empty_conversations", f"`conversations` must be a non-empty list, got {what}", rid
    turns: list[dict[str, str]] = []
    for i, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and turn.get("from") in ("human", "gpt") and isinstance(turn.get("value"), str)):
            return "bad_turn", f"turn {i} must be {{from: human|gpt, value: string}}, got {brief(turn)}", rid
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            return (
                "turn_order",
                f"turn {i} is from {brief(turn['from'])}, expected {expected!r} (human, gpt, human, ...)",
                rid,
            )
        turns.append({"from": turn["from"], "value": turn["value"]})
    if len(turns) % 2:
        return "turn_order", "the last turn is from 'human': every question needs a gpt answer", rid
    image = obj.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip() or "\x00" in image):
        return "bad_image_path", f"`image` must be a non-empty path string without NUL, got {brief(image)}", rid
    counts = [turn["value"].count(IMAGE_TOKEN) for turn in turns]
    total = sum(counts)
    if image is None:
        if total:
            return "image_token_unexpected", f"text-only record (no `image`) contains {total} {IMAGE_TOKEN}", rid
    elif total > 1:
        return "image_token_repeated", f"{total} {IMAGE_TOKEN} tokens; expected one, in the first human turn", rid
    elif counts[0] != 1:
        where = "no turn" if total == 0 else f"turn {counts.index(1)}"
        return "image_token_missing", f"{IMAGE_TOKEN} must be in the first human turn; found in {where}", rid
    return Record(index, line, rid, image, turns)


def _iter_checks(root: str, rels: list[str], pool: Executor | None) -> Iterator[tuple[str, ImageCheck]]:
    """Check images in input order, in-process or through the pool (results still come back in order)."""
    chunks = [rels[i : i + _CHUNK] for i in range(0, len(rels), _CHUNK)]
    check = partial(check_images, root)
    for chunk, checks in zip(chunks, map(check, chunks) if pool is None else pool.map(check, chunks), strict=True):
        yield from zip(chunk, checks, strict=True)


def _check_split(
    name: str,
    source: Path,
    shown_source: str,
    root: str,
    *,
    strict: bool,
    pool: Executor | None,
    progress: Progress,
) -> tuple[list[Record], dict[str, ImageCheck], list[Skip]]:
    """Validate one split: structural pass, then the image checks (deduplicated by path).

    Returns the records kept, the image checks by path and the skips in line order; with strict, the first
    skip (by line) is raised instead.
    """
    records, skips = _read_records(name, source, shown_source, strict=strict, progress=progress)
    checks = _check_images(name, records, root, strict=strict, pool=pool, progress=progress)
    kept: list[Record] = []
    for record in records:
        check = checks.get(record.image) if record.image is not None else None
        if record.image is not None and check is None:
            break  # strict stopped the image checks before this record
        if check is not None and check.reason is not None:
            skips.append(Skip(name, shown_source, record.index, record.line, record.id, check.reason, check.detail))
            continue
        kept.append(record)
    skips.sort(key=lambda s: s.index)
    if strict and skips:
        raise DataError(
            skips[0].message() + "\n(--strict stops at the first bad record; without it bad records "
            "are skipped and listed in skipped.jsonl)"
        )
    return kept, checks, skips


def _read_records(
    name: str, source: Path, shown_source: str, *, strict: bool, progress: Progress
) -> tuple[list[Record], list[Skip]]:
    """The structural pass: structurally valid records with unique ids, and the skips of the others."""
    records: list[Record] = []
    skips: list[Skip] = []
    first_line: dict[str, int] = {}
    reading = progress.add_task(f"{name}: reading {source.name}", total=None)
    for index, (line, obj) in enumerate(read_source(source)):
        if index % 1000 == 999:
            progress.update(reading, completed=index + 1)
        checked = check_record(obj, index, line)
        if isinstance(checked, Record) and checked.id in first_line:
            checked = (
                "duplicate_id",
                f"id {brief(checked.id)} already used at line {first_line[checked.id]}",
                checked.id,
            )
        if isinstance(checked, Record):
            first_line[checked.id] = line
            records.append(checked)
            continue
        reason, detail, rid = checked
        skips.append(Skip(name, shown_source, index, line, rid, reason, detail))
        if strict:
            break  # records after the first bad one are not needed; earlier ones still get image checks
    progress.remove_task(reading)
    return records, skips


def _check_images(
    name: str, records: list[Record], root: str, *, strict: bool, pool: Executor | None, progress: Progress
) -> dict[str, ImageCheck]:
    """Check each distinct image of `records` once; with strict, stop at the first bad one."""
    unique = list(dict.fromkeys(r.image for r in records if r.image is not None))
    results: dict[str, ImageCheck] = {}
    task = progress.add_task(f"{name}: checking images", total=len(unique))
    checks = _iter_checks(root, unique, pool)
    for rel, check in checks:
        results[rel] = check
        progress.advance(task)
        if strict and check.reason is not None:
            break
    progress.remove_task(task)
    checks.close()
    return results


# -------------------------------------------------------------------------------------------- writing


def _write_split(path: Path, records: list[Record], checks: dict[str, ImageCheck]) -> None:
    sizes = [checks[r.image] if r.image is not None else None for r in records]
    table = pa.table(
        {
            "id": [r.id for r in records],
            "image": [r.image for r in records],
            "conversations": [json.dumps(r.conversations, ensure_ascii=False) for r in records],
            "width": [s.width if s else None for s in sizes],
            "height": [s.height if s else None for s in sizes],
            "length": [word_length(r.conversations) for r in records],
        },
        schema=PARQUET_SCHEMA,
    )
    pq.write_table(table, path)
    write_arrow_copy(path)  # what training memory-maps


def _shown(path: Path, dest: Path) -> str:
    """A source inside the dataset is recorded relative to it (it moves with the dataset), else absolute."""
    path = path.resolve()
    return str(path.relative_to(dest.resolve())) if path.is_relative_to(dest.resolve()) else str(path)


def prepare_into(
    dest: Path,
    splits: dict[str, Path],
    image_root: Path,
    *,
    manifest_image_root: str,
    kind: str,
    options: dict[str, Any],
    strict: bool = False,
    allow_empty: bool = False,
    workers: int = 1,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    latents: LatentRequest | None = None,
) -> dict[str, Any]:
    """Validate `splits` and write parquet files, skipped.jsonl and manifest.json into `dest`, then the latent
    cache if `latents` asks for one. A split that keeps no record raises EmptyInputError unless `allow_empty`.

    The one preparation path: `prepare_llava`, the synthetic set and the hub all end here. `dest` is the
    temporary directory of an `atomic_output`. Returns the manifest.
    """
    if not splits:
        raise DataError("no input split given: pass --align FILE and/or --instruct FILE")
    for name in splits:
        if not SPLIT_NAME.match(name):
            raise DataError(f"split name {name!r} must be letters, digits, '_' or '-'")
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if not image_root.is_dir():
        raise DataError(f"image root {image_root} is not a directory")
    root = str(image_root.resolve())
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "dsvlm_version": __version__,
        "created": now_iso(),
        "kind": kind,
        "image_root": manifest_image_root,
        "splits": {},
        "options": options,
    }
    all_skips: list[Skip] = []
    with _image_pool(workers) as pool, progress_bar(progress) as bar:
        for name, source in splits.items():
            shown = _shown(source, dest)
            records, checks, skips = _check_split(name, source, shown, root, strict=strict, pool=pool, progress=bar)
            _write_split(dest / f"{name}.parquet", records, checks)
            all_skips.extend(skips)
            manifest["splits"][name] = {
                "file": f"{name}.parquet",
                "records": len(records),
                "skipped": dict(sorted(Counter(s.reason for s in skips).items())),
                "source": {"path": shown, "sha256": sha256_file(source)},
            }
            log.debug("%s: %d records kept, %d skipped", name, len(records), len(skips))
    if not allow_empty:
        _refuse_empty(manifest["splits"], splits, all_skips)
    _write_skips(dest / SKIPPED, all_skips)
    manifest.update(extra or {})
    atomic_write_json(dest / MANIFEST, manifest, ensure_ascii=False)
    if latents is not None:
        manifest = latents.build(dest, progress=progress)
    return manifest


def _refuse_empty(written: dict[str, Any], sources: dict[str, Path], skips: list[Skip]) -> None:
    problems = []
    for name, info in written.items():
        if info["records"]:
            continue
        skipped = info["skipped"]
        if not skipped:
            problems.append(f"--{name} {sources[name]} holds no record")
            continue
        reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items())
        first = next(skip for skip in skips if skip.split == name)
        problems.append(
            f"--{name}: all {sum(skipped.values())} records were skipped ({reasons}); the first: {first.message()}"
        )
    if problems:
        raise EmptyInputError("; ".join(problems) + " (--allow-empty writes the dataset anyway)", skips)


def _write_skips(path: Path, skips: list[Skip]) -> None:
    atomic_write_text(path, "".join(json.dumps(asdict(skip), ensure_ascii=False) + "\n" for skip in skips))


def _is_skip_report(path: Path) -> bool:
    """Whether `path` is a skipped report dsvlm wrote (empty, or its first line a skip): one we may replace."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        first = fh.readline(1 << 16)
    try:
        return not first or "reason" in json.loads(first)
    except (ValueError, TypeError):
        return False


@contextlib.contextmanager
def report_empty_input(out: Path) -> Iterator[None]:
    """Around the `atomic_output` of `out`: an input that kept no record leaves no dataset, but its skipped report
    is written next to OUT (`OUT.skipped.jsonl`) so that the reasons can be read."""
    try:
        yield
    except EmptyInputError as exc:
        report = out.with_name(f"{out.name}.skipped.jsonl")
        if not exc.skips:
            raise DataError(f"{exc}; nothing was written") from None
        if report.exists() and not (report.is_file() and _is_skip_report(report)):
            raise DataError(
                f"{exc}; nothing was written ({report} exists and is not a skipped report, so the "
                "report was not written over it)"
            ) from None
        _write_skips(report, exc.skips)
        raise DataError(f"{exc}; no dataset written, every skip with its reason is in {report}") from None


@contextlib.contextmanager
def _image_pool(workers: int) -> Iterator[Executor | None]:
    """Worker processes for the image checks; None (check in this process) for a single worker."""
    if workers == 1:
        yield None
        return
    # spawn, not fork: the parent may hold torch/OpenMP threads and rich's refresh thread; the workers only
    # need dsvlm.data.images.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_llava_inputs(out: Path, splits: dict[str, Path], image_root: Path) -> Path:
    """DataError for a missing input file or image root (cheap: callers check before loading a VAE for the
    latent cache); returns the image root, user-expanded."""
    image_root = Path(image_root).expanduser()
    if not image_root.is_dir():
        raise DataError(f"--image-root {image_root} is not a directory")
    if image_root.resolve().is_relative_to(Path(out).resolve()):
        raise DataError(f"--image-root {image_root} is inside OUT {out}, which prepare replaces; move the images")
    for name, source in splits.items():
        if not Path(source).is_file():
            raise DataError(f"--{name} {source}: no such file")
    return image_root


def prepare_llava(
    out: Path,
    splits: dict[str, Path],
    image_root: Path,
    *,
    strict: bool = False,
    allow_empty: bool = False,
    workers: int = 1,
    overwrite: bool = False,
    latents: LatentRequest | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare LLaVA-format files (split name -> JSON/JSONL file) into `out`, atomically. Returns the manifest.

    `latents` also builds the VAE latent cache inside the new dataset before it is moved into place.
    """
    out = Path(out)
    image_root = check_llava_inputs(out, splits, image_root)
    options = {
        "splits": {name: str(Path(src).resolve()) for name, src in splits.items()},
        "image_root": str(image_root.resolve()),
        "strict": strict,
        "allow_empty": allow_empty,
        "workers": workers,
    }
    with report_empty_input(out), atomic_output(out, overwrite) as tmp:
        return prepare_into(
            tmp,
            {name: Path(src) for name, src in splits.items()},
            image_root,
            manifest_image_root=str(image_root.resolve()),
            kind="llava",
            options=options,
            strict=strict,
            allow_empty=allow_empty,
            workers=workers,
            progress=progress,
            latents=latents,
        )


def summary_table(manifest: dict[str, Any], title: str = "prepared") -> Table:
    """The end-of-run table: kept and skipped records per split, skips broken down by reason."""
    table = Table("split", "kept", "skipped", "reasons", "source", title=title)
    for name, split in manifest["splits"].items():
        skipped = split["skipped"]
        reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items()) or "-"
        table.add_row(name, str(split["records"]), str(sum(skipped.values())), reasons, split["source"]["path"])
    return table
