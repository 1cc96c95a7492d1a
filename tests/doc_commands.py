"""The commands quoted in README.md, docs/*.md and the recipe headers, parsed out of the files and run for real.

`parse_*` turn the files into snippets (a fenced bash block or a recipe header is one script whose lines depend
on each other; an inline backtick span that is a complete command is a one-line script). `run_snippet` runs a
snippet's script with bash in a working directory, with `dsvlm` and `lmms-eval` shims first on PATH: the shims
(this file run as a program) shrink sizes (steps, batch, record counts, probe sizes) and nothing else, run the
real program with the test's interpreter, and log each invocation. `problems` judges every invocation: it must
succeed, or, where the command needs the hub, hub models or a cluster's data, fail the clean way (exit 2, one
`error:` line naming the reason, no traceback, no usage error).

Stdlib only at the top: the shims import this file once per documented command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from helpers import REPO, tiny_sizes

# Sizes appended to the documented command lines (the last value of an option or override wins), so that a
# documented command trains, prepares, evaluates and probes in seconds. Flags and arguments stay as documented.
TRAIN_SIZES = tiny_sizes(steps=2)
ABLATE_SIZES = ["ablate.probe_train=32", "ablate.probe_test=32", "ablate.probe_steps=5"]
PRETRAIN_SIZES = ["--steps", "2", "--batch-size", "4"]
SYNTHETIC_SIZES = ["--n-align", "32", "--n-instruct", "32", "--n-eval", "16"]
EVAL_SIZES = ["--limit", "8"]
PROBE_SIZES = ["--n-train", "32", "--n-test", "32", "--steps", "5"]
LMMS_EVAL_LIMIT = ["--limit", "4"]

# A documented command that needs what this machine cannot have must fail fast and cleanly: exit 2 with one
# `error:` line matching the pattern. (what the command matches, the error line's pattern, why).
EXPECTED_FAILURES: list[tuple[str, str, str]] = [
    (r"^dsvlm prepare hub ", r"offline", "downloads a hub dataset (the test runs offline)"),
    (
        r"^dsvlm (train|ablate) (llava15-vicuna7b-ds(-lora)?|siglip-qwen2-ds)\b",
        r"no prepared dataset|offline",
        "paper recipe: LLaVA-1.5's data prepared on a cluster, 7B models and SD 1.5 from the hub",
    ),
    # before --latents: prepare checks its inputs before it loads the VAE
    (r"/datasets/llava\b", r"no such|not found|not a directory", "LLaVA-1.5's images on a cluster"),
    (
        r"--latents (llava15-vicuna7b-ds|siglip-qwen2-ds)\b",
        r"cannot load|offline",
        "caches the latents of SD 1.5's VAE, which comes from the hub",
    ),
    (r"/data/mmbench_dev_en\.parquet", r"no such file", "a benchmark copy on a cluster"),
    (
        r"^dsvlm eval (?!.*--data-files).*--bench mmbench(\s|$)",
        r"offline",
        "mmbench's data comes from the hub without --data-files",
    ),
]

# Documented commands the test does not run, each with the reason; a command matching none of the runnable
# programs and none of these fails the test until it is classified here.
EXEMPT: list[tuple[str, str]] = [
    (
        r"^make demo$",
        "scripts/demo.sh in a fresh virtual environment: its pipeline is the README's lifecycle "
        "block, which this test runs",
    ),
    (r"^make test$", "the test suite itself (CI runs it)"),
    (
        r"^make replicate",
        "the miniature replication: 15 full cells, 32 minutes here, on demand (docs/replication.md has its results); "
        "its `dsvlm ablate --cell` / `--report-only` lines are the README's ablate block, which this test runs",
    ),
    (r"^make install TORCH=torch$", "builds a virtual environment, downloading torch (network, minutes)"),
    (
        r"^(OMP_NUM_THREADS=\d+ )?OMP_WAIT_POLICY=PASSIVE \.venv/bin/python benchmarks/\w+\.py( --[\w-]+( \S+)?)*$",
        "an on-demand benchmark (minutes); test_benchmark_commands_name_real_flags checks its script and flags",
    ),
]

# Inline spans that name a command's option or output in prose rather than quote a command to run.
MENTIONS: dict[str, str] = {
    "dsvlm strip --json": "names the report `strip --json` prints (docs/benchmarks.md's table header)",
    "dsvlm prepare synthetic --n-align 256 --n-instruct 256 --n-eval 16": (
        "names the sizes of the benchmark's dataset, which benchmarks/train_overhead.py prepares itself"
    ),
    "dsvlm prepare llava": "the command's name (a table row, a section title)",
    "dsvlm prepare synthetic": "the command's name, in prose",
}

COMMAND_PREFIXES = ("dsvlm ", "accelerate launch", "torchrun", "lmms-eval", "make ")
LAUNCHERS = ("accelerate launch", "torchrun")
# An upper-case word of three or more letters stands for a value the reader fills in (RUN, DIR, MODEL, NODE0).
PLACEHOLDER = re.compile(r"(?<![\w.-])(\.\.\.|…|[A-Z][A-Z0-9_]{2,})(?![\w=])")
RUNNABLE = re.compile(r"^(?:\w+=\$\()?(dsvlm|lmms-eval)\s")


@dataclass(frozen=True)
class Command:
    """One documented command: `text` as written (continuations joined, comment dropped); `run` the shell text
    the test runs (the dsvlm part of a launcher line, `...` expanded), empty when it is not run."""

    text: str
    run: str = ""
    status: str = "run"  # run | exempt | syntax | unclassified
    reason: str = ""
    launcher: str = ""


@dataclass(frozen=True)
class Snippet:
    source: str  # file:line
    kind: str  # block | header | inline
    commands: tuple[Command, ...]

    @property
    def runnable(self) -> list[Command]:
        return [c for c in self.commands if c.status == "run"]

    @property
    def script(self) -> str:
        return "\n".join(c.run for c in self.runnable) + "\n"


# ---------------------------------------------------------------------------------------------- parsing


def strip_comment(line: str) -> str:
    """`line` without a shell comment: a `#` at the start or after whitespace, outside quotes."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(offset of the first physical line, command) for each command of a shell text: `\\` continuations
    joined, comments and blank lines dropped."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines()):
        line = strip_comment(raw)
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line.strip())
        command = " ".join(part for part in pending if part)
        pending = []
        if command:
            out.append((start, command))
    return out


def classify(text: str, earlier: list[Command]) -> Command:
    """What the test does with one documented command; `earlier` are the commands before it in its script
    (a `...` stands for the arguments of the earlier command that starts the same way)."""
    for pattern, reason in EXEMPT:
        if re.search(pattern, text):
            return Command(text, status="exempt", reason=reason)
    run, launcher = text, ""
    if text.startswith(LAUNCHERS):
        launcher, sep, rest = text.partition(" -m dsvlm ")
        if not sep:
            return Command(text, status="syntax", reason="launcher options only, no program")
        run = "dsvlm " + rest
    if not RUNNABLE.match(run):
        return Command(text, status="unclassified", reason="not a dsvlm/lmms-eval command and not exempt")
    if " ... " in f"{run} ":
        prefix, _, after = f"{run} ".partition(" ... ")
        previous = next(
            (c.run for c in reversed(earlier) if c.run.startswith(prefix + " ") and " ... " not in f"{c.text} "), None
        )
        if previous is None:
            return Command(text, status="syntax", reason="`...` with no earlier command to take it from")
        run = f"{previous} {after}".strip()
    if PLACEHOLDER.search(run):
        return Command(text, status="syntax", reason=f"placeholder {PLACEHOLDER.search(run).group(1)}")
    return Command(text, run=run, launcher=launcher)


def parse_script(text: str) -> list[Command]:
    commands: list[Command] = []
    for _, line in logical_lines(text):
        commands.append(classify(line, commands))
    return commands


FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def parse_markdown(path: Path) -> list[Snippet]:
    """The fenced bash blocks and the inline command spans of one markdown file."""
    name = path.relative_to(REPO).as_posix()
    text = path.read_text()
    snippets = [
        Snippet(f"{name}:{text.count(chr(10), 0, m.start()) + 1}", "block", tuple(parse_script(m.group(2))))
        for m in FENCE.finditer(text)
        if m.group(1) == "bash"
    ]
    # Inline spans outside fenced blocks: blank the blocks out, keeping the line count.
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in re.finditer(r"`([^`]+)`", prose):
        span = " ".join(m.group(1).split())
        if span.startswith(COMMAND_PREFIXES) and len(span.split()) >= 3:
            line = prose.count("\n", 0, m.start()) + 1
            snippets.append(Snippet(f"{name}:{line}", "inline", (classify(span, []),)))
    return snippets


def parse_recipe_header(path: Path) -> Snippet | None:
    """The commands in a recipe's leading comment (lines `#   <command>`), as one script."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("#   ") and line[4:].strip():
            lines.append(line[4:])
    if not lines:
        return None
    return Snippet(f"{path.relative_to(REPO).as_posix()}:1", "header", tuple(parse_script("\n".join(lines))))


def documented_snippets() -> list[Snippet]:
    """Every snippet of README.md, docs/*.md and recipes/*.yaml. An inline span that repeats a command of a
    block or header (it runs there) or is listed in MENTIONS is left out."""
    snippets = [s for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))] for s in parse_markdown(p)]
    snippets += [s for p in sorted((REPO / "recipes").glob("*.yaml")) if (s := parse_recipe_header(p))]
    in_scripts = {c.text for s in snippets if s.kind != "inline" for c in s.commands}
    return [
        s
        for s in snippets
        if s.kind != "inline" or (s.commands[0].text not in in_scripts and s.commands[0].text not in MENTIONS)
    ]


def inline_mentions() -> set[str]:
    return {
        s.commands[0].text
        for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
        for s in parse_markdown(p)
        if s.kind == "inline"
    } & set(MENTIONS)


# ---------------------------------------------------------------------------------------------- the shims


def dsvlm_argv(argv: list[str]) -> list[str]:
    """A dsvlm command line with tiny sizes appended (nothing else changes)."""
    if "--help" in argv:
        return argv
    words = [a for a in argv if not a.startswith("-")]
    command = " ".join(words[:2])
    if command.startswith("train "):
        return [*argv, *TRAIN_SIZES]
    if command.startswith("ablate "):
        # One seed for a grid; a single `--cell ARM:SEED` keeps the seeds that name it.
        seeds = [] if "--cell" in argv else ["--seeds", "0"]
        return [*argv, *TRAIN_SIZES, *ABLATE_SIZES, *seeds]
    if command.startswith("pretrain-diffusion "):
        return [*argv, *PRETRAIN_SIZES]
    if command == "prepare synthetic":
        return [*argv, *SYNTHETIC_SIZES]
    if command.startswith("eval "):
        return [*argv, *EVAL_SIZES]
    if command.startswith("probe "):
        return [*argv, *PROBE_SIZES]
    return argv


def lmms_eval_argv(argv: list[str], task: str, include_dir: str) -> list[str]:
    """An lmms-eval command line on the local tiny task: the documented task needs the hub's data."""
    out = list(argv)
    if "--tasks" in out:
        out[out.index("--tasks") + 1] = task
    return [*out, "--include_path", include_dir, *LMMS_EVAL_LIMIT]


def shim(program: str, argv: list[str]) -> int:
    """Run `program` (dsvlm or lmms-eval) with tiny sizes, pass its output through, log the invocation."""
    if program == "dsvlm":
        run_argv = dsvlm_argv(argv)
        proc = _forked_dsvlm(os.environ["DOCCMD_ZYGOTE"], run_argv)  # the CLI without the import time
        stdout = ""
    else:
        run_argv = lmms_eval_argv(argv, os.environ["DOCCMD_LMMS_TASK"], os.environ["DOCCMD_LMMS_TASKS_DIR"])
        code = "import sys; from lmms_eval.cli.dispatch import main; sys.argv[0] = 'lmms-eval'; sys.exit(main())"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-c", code, *run_argv], capture_output=True, text=True, env=env)
        stdout = proc.stdout
        sys.stdout.write(stdout)
    sys.stderr.write(proc.stderr)
    record = {
        "program": program,
        "argv": argv,
        "run_argv": run_argv,
        "rc": proc.returncode,
        "lmms_task": os.environ.get("DOCCMD_LMMS_TASK", ""),
        "stderr": proc.stderr[-6000:],
        "stdout": stdout[-6000:],
    }
    with open(os.environ["DOCCMD_LOG"], "a") as log:
        log.write(json.dumps(record) + "\n")
    return proc.returncode


def _forked_dsvlm(server: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`dsvlm ARGV` run by the fork server (tests/doc_zygote.py) with this process's stdin and stdout and a pipe
    for stderr, read while the command runs."""
    from doc_zygote import request

    read_end, write_end = os.pipe()
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b"")))
    reader.start()
    try:
        code = request(server, argv, 0, 1, write_end)
    finally:
        os.close(write_end)
        reader.join()
        os.close(read_end)
    return subprocess.CompletedProcess(argv, code, None, b"".join(chunks).decode(errors="replace"))


def install_shims(bin_dir: Path, server: str) -> Path:
    """`dsvlm` and `lmms-eval` shims in `bin_dir`; dsvlm commands run in `server` (a doc_zygote socket)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    env = f"DOCCMD_ZYGOTE={shlex.quote(server)} "
    for program in ("dsvlm", "lmms-eval"):
        path = bin_dir / program
        path.write_text(f'#!/bin/sh\n{env}exec {shlex.quote(sys.executable)} {shlex.quote(__file__)} {program} "$@"\n')
        path.chmod(0o755)
    return bin_dir


# ---------------------------------------------------------------------------------------------- running


@dataclass
class ScriptResult:
    script: str
    returncode: int
    stdout: str
    stderr: str
    invocations: list[dict] = field(default_factory=list)


def run_script(script: str, cwd: Path, bin_dir: Path, env: dict[str, str], timeout: float = 600) -> ScriptResult:
    """Run a shell script in `cwd` with the shims first on PATH (no `set -e`: every line runs and is judged)."""
    log = cwd / ".doc-commands.jsonl"
    log.unlink(missing_ok=True)
    (cwd / ".doc-script.sh").write_text(script)
    proc = subprocess.run(
        ["bash", "--noprofile", "--norc", ".doc-script.sh"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            **os.environ,
            **env,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "DOCCMD_LOG": str(log),
            "COLUMNS": "160",
        },
    )
    invocations = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return ScriptResult(script, proc.returncode, proc.stdout, proc.stderr, invocations)


def expected_failure(command: str) -> tuple[str, str] | None:
    """(error pattern, reason) when `command` cannot succeed here and must fail cleanly, else None."""
    for pattern, error, reason in EXPECTED_FAILURES:
        if re.search(pattern, command):
            return error, reason
    return None


def judge(command: Command, invocation: dict) -> str | None:
    """What is wrong with one invocation of a documented command, or None."""
    rc, stderr = invocation["rc"], invocation["stderr"]
    expected = expected_failure(command.run)
    if expected is None:
        if rc != 0:
            return f"exit {rc}:\n{stderr[-2500:]}"
        if invocation["program"] == "lmms-eval" and (
            "Error during evaluation" in stderr or f"|{invocation['lmms_task']}" not in invocation["stdout"]
        ):
            return f"lmms-eval scored nothing:\n{stderr[-2500:]}"
        return None
    error, reason = expected
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    clean = rc == 2 and "Traceback" not in stderr and "Usage:" not in stderr and len(errors) == 1
    if not (clean and re.search(error, errors[0], re.I)):
        return (
            f"expected a clean failure ({reason}): exit 2, one `error:` line matching {error!r}, no traceback "
            f"or usage error; got exit {rc}:\n{stderr[-2500:]}"
        )
    return None


BASH_ERROR = re.compile(r"^\S*\.doc-script\.sh: line \d+: .*$", re.M)


def problems(commands: list[Command], result: ScriptResult) -> list[str]:
    """Everything wrong with a script's run: bash errors, a command that did not run, and each invocation that
    neither succeeded nor failed the expected clean way."""
    found = [f"bash: {m.group(0)}" for m in BASH_ERROR.finditer(result.stderr)]
    if len(result.invocations) != len(commands):
        found.append(
            f"{len(commands)} documented commands but {len(result.invocations)} invocations:\n"
            + "\n".join(" ".join(i["argv"]) for i in result.invocations)
            + f"\n{result.stderr[-2500:]}"
        )
        return found
    for command, invocation in zip(commands, result.invocations, strict=True):
        if (problem := judge(command, invocation)) is not None:
            found.append(
                f"`{command.text}` (ran `{shlex.join([invocation['program'], *invocation['run_argv']])}`): {problem}"
            )
    return found


def outputs_of(command: str) -> list[str]:
    """Paths a dsvlm command creates and refuses to overwrite without --overwrite (prepare's OUT, strip's --out,
    `recipe cp`'s destination): removed from a working copy before the script that creates them runs."""
    command = re.sub(r"^\w+=\$\((.*)\)$", r"\1", command)
    try:
        words = shlex.split(command)
    except ValueError:
        return []
    if words[:1] != ["dsvlm"]:
        return []
    positional = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
    if words[1:3] in (["prepare", "synthetic"], ["prepare", "llava"]) and len(positional) >= 3:
        return [positional[2]]
    if words[1:3] == ["prepare", "hub"] and len(positional) >= 4:
        return [positional[3]]
    if words[1:3] == ["recipe", "cp"] and len(positional) >= 4:
        return [positional[3]]
    if words[1:2] == ["strip"]:
        for flag in ("--out", "-o"):
            if flag in words:
                return [words[words.index(flag) + 1]]
    return []


if __name__ == "__main__":
    sys.exit(shim(sys.argv[1], sys.argv[2:]))
