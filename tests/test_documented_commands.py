"""Every command quoted in README.md, docs/*.md and the recipe headers runs (issue 10, item 7).

Each fenced bash block and each recipe header runs as one bash script (its lines depend on each other); each
inline span that is a complete command runs alone. They run for real, at tiny sizes (tests/doc_commands.py:
steps, batches and record counts are appended, flags and arguments stay as documented), in a copy of a small
user's working directory, FIXTURE_SCRIPT's outputs: what a reader who followed the README has when a block
refers to `data/synthetic`, `my.yaml`, `runs/x` or `models/x`. Commands that need the hub, 7B models or a
cluster's data must fail the clean way (exit 2, one `error:` line naming the reason); multi-GPU and multi-node
launches run the dsvlm part after `-m dsvlm`. Exemptions, mentions and syntax descriptions are listed in
tests/doc_commands.py and shown below as test ids.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from doc_commands import (
    EXEMPT,
    EXPECTED_FAILURES,
    MENTIONS,
    REPO,
    Snippet,
    documented_snippets,
    inline_mentions,
    install_shims,
    outputs_of,
    parse_script,
    problems,
    run_script,
)

pytestmark = pytest.mark.slow

SNIPPETS = documented_snippets()
RUNNABLE = [s for s in SNIPPETS if s.runnable]
NOT_RUN = [(s.source, c) for s in SNIPPETS for c in s.commands if c.status in ("exempt", "syntax")]

# The working directory every snippet starts from (each gets its own copy): the dataset, the pretrained toy
# diffusion model where the recipe expects them; `my.yaml`, the reader's copy of tiny-synthetic edited to write
# its own run folder (a plain copy would share runs/tiny-synthetic with `dsvlm train tiny-synthetic`, the
# Training block's first line); a finished run `runs/x` with its stripped model `models/x` (the README's
# example names), a second stripped model `models/ds` (a copy) and an earlier summary for the `--compare` example.
FIXTURE_SCRIPT = """\
dsvlm prepare synthetic data/synthetic
dsvlm pretrain-diffusion data/synthetic --out runs/tiny-diffusion
dsvlm recipe cp tiny-synthetic my.yaml
sed -i 's#output_dir: runs/tiny-synthetic#output_dir: runs/my#' my.yaml
dsvlm train my.yaml run.output_dir=runs/x
dsvlm strip runs/x --out models/x
cp -r models/x models/ds
dsvlm eval models/x --bench synthetic --data-files synthetic=data/synthetic --out results/baseline/mmbench
"""


@pytest.fixture(scope="module")
def shims(tmp_path_factory) -> Iterator[Path]:
    """The shims, with dsvlm commands run by a fork server that has imported the libraries once (doc_zygote.py)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    # a short path: a Unix socket's name is limited to about 100 bytes
    socket_dir = Path(tempfile.mkdtemp(prefix="doczyg-"))
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("doc_zygote.py")), str(socket_dir / "s")],
        stdout=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "COLUMNS": "160",  # as run_script sets it: the stderr console reads it once, at import
        },
    )
    try:
        assert server.stdout.readline() == "ready\n", "the doc-commands fork server did not start"
        yield install_shims(bin_dir, str(socket_dir / "s"))
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shims) -> Path:
    """Built once per test session: under xdist the first worker builds it in the session's shared temp folder
    while the other waits on the lock; snippets only read it (each runs in its own copy)."""
    from filelock import FileLock

    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    root = tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.mktemp("doc")
    cwd = root / "doc-workspace"
    with FileLock(str(root / "doc-workspace.lock")):
        if not (root / "doc-workspace.ready").is_file():
            shutil.rmtree(cwd, ignore_errors=True)  # a worker that failed half-way
            cwd.mkdir()
            result = run_script(FIXTURE_SCRIPT, cwd, shims, {})
            commands = [c for c in parse_script(FIXTURE_SCRIPT) if c.status == "run"]
            assert not (found := problems(commands, result)), "\n\n".join(found)
            assert "output_dir: runs/my" in (cwd / "my.yaml").read_text()
            (cwd / ".doc-commands.jsonl").unlink()
            (root / "doc-workspace.ready").touch()
    return cwd


@pytest.fixture(scope="module")
def lmms_env(tmp_path_factory, workspace) -> dict[str, str]:
    """`lmms-eval` runs the documented model arguments on a local tiny task (the workspace's synthetic eval set
    in MMBench's format): the documented task's data comes from the hub."""
    from dsvlm.evaluation.benches import get_benchmark, resolve_data_file, write_task_yaml

    tasks = tmp_path_factory.mktemp("lmms-tasks")
    bench = get_benchmark("synthetic")
    task = write_task_yaml(bench, tasks, resolve_data_file(bench, workspace / "data" / "synthetic"), 4)
    return {"DOCCMD_LMMS_TASK": task, "DOCCMD_LMMS_TASKS_DIR": str(tasks)}


def working_copy(workspace: Path, snippet: Snippet, target: Path) -> Path:
    """A copy of the workspace without the outputs the snippet creates (they would exist already)."""
    shutil.copytree(workspace, target)
    for command in snippet.runnable:
        for output in outputs_of(command.run):
            path = target / output
            if path.is_dir():
                shutil.rmtree(path)
            path.unlink(missing_ok=True)
    return target


@pytest.mark.parametrize("snippet", RUNNABLE, ids=lambda s: f"{s.source} ({s.kind})")
def test_documented_commands_run(snippet: Snippet, workspace, shims, lmms_env, tmp_path):
    cwd = working_copy(workspace, snippet, tmp_path / "cwd")
    result = run_script(snippet.script, cwd, shims, lmms_env)
    found = problems(snippet.runnable, result)
    for command in snippet.runnable:  # a launcher's config file is a path in this repository
        for config in re.findall(r"--config_file (\S+)", command.launcher):
            if not (REPO / config).is_file():
                found.append(f"`{command.text}`: no {config} in the repository")
    assert not found, f"{snippet.source}:\n" + "\n\n".join(found)


@pytest.mark.parametrize(
    ("source", "command"), NOT_RUN, ids=[f"{src} {c.text} -> {c.status}: {c.reason}" for src, c in NOT_RUN]
)
def test_commands_not_run_are_exempt_or_syntax(source, command):
    """The documented commands the test does not run, visible as test ids: each is exempt for a stated reason
    or a syntax description (placeholders, `...`, launcher options without a program)."""
    assert command.reason
    assert command.status == "exempt" or command.reason.startswith(("placeholder", "`...`", "launcher options"))


def test_every_documented_command_is_classified():
    """A newly documented command is either run (dsvlm, lmms-eval, a launcher of dsvlm) or listed as exempt."""
    unclassified = [f"{s.source}: {c.text}" for s in SNIPPETS for c in s.commands if c.status == "unclassified"]
    assert not unclassified, "classify these in tests/doc_commands.py (EXEMPT):\n" + "\n".join(unclassified)


def test_exemption_lists_are_current():
    """No exemption, mention or expected failure outlives the command it was written for."""
    commands = [c for s in SNIPPETS for c in s.commands]
    assert [p for p, _ in EXEMPT if not any(re.search(p, c.text) for c in commands)] == []
    assert set(MENTIONS) - inline_mentions() == set()
    assert [p for p, _, _ in EXPECTED_FAILURES if not any(re.search(p, c.run) for c in commands)] == []
    assert len(RUNNABLE) >= 10 and sum(len(s.runnable) for s in RUNNABLE) >= 30


def test_benchmark_commands_name_real_flags():
    """The exempt benchmark commands name scripts that exist and flags they define."""
    benchmarks = [c.text for _, c in NOT_RUN if "benchmarks/" in c.text]
    assert benchmarks
    for text in benchmarks:
        script = REPO / re.search(r"benchmarks/\w+\.py", text).group(0)
        assert script.is_file(), text
        for flag in re.findall(r"\s(--[\w-]+)", text):
            assert f'"{flag}"' in script.read_text(), f"{script.name} defines no {flag}"


def test_parser_joins_lines_drops_comments_and_expands_ellipsis():
    commands = parse_script(
        "# a comment line\n"
        "dsvlm ablate tiny-synthetic \\\n  --arm ds --seeds 0,1   # trailing comment\n"
        "dsvlm ablate tiny-synthetic ... --cell ds:1\n"
        "data=$(dsvlm prepare synthetic data/s)   # keeps the assignment\n"
        "dsvlm strip RUN --out MODEL\n"
        "accelerate launch --num_processes 8 -m dsvlm train tiny-synthetic '#not a comment'\n"
        "accelerate launch --cpu --num_processes 2\n"
        "rm -rf data\n"
    )
    assert [(c.status, c.run) for c in commands] == [
        ("run", "dsvlm ablate tiny-synthetic --arm ds --seeds 0,1"),
        ("run", "dsvlm ablate tiny-synthetic --arm ds --seeds 0,1 --cell ds:1"),
        ("run", "data=$(dsvlm prepare synthetic data/s)"),
        ("syntax", ""),
        ("run", "dsvlm train tiny-synthetic '#not a comment'"),
        ("syntax", ""),
        ("unclassified", ""),
    ]
    assert commands[4].launcher == "accelerate launch --num_processes 8"


def test_runner_reports_a_documented_command_that_no_longer_works(shims, tmp_path):
    """A wrong flag fails the test, also on a line that is expected to fail cleanly (a usage error is not the
    clean failure), and so does a bash error. (The documented `prepare hub` line, failing cleanly, passes in
    test_documented_commands_run.)"""
    commands = parse_script(
        "dsvlm train tiny-synthetic --no-such-flag\n"
        "dsvlm prepare hub liuhaotian/LLaVA-Pretrain data/pretrain --no-such-flag\n"
    )
    result = run_script("\n".join(c.run for c in commands) + "\n", tmp_path, shims, {})
    found = problems(commands, result)
    assert len(found) == 2
    assert "--no-such-flag" in found[0] and "exit 2" in found[0]
    assert "expected a clean failure" in found[1] and "No such option" in found[1]

    result = run_script("undefined-program-xyz\n", tmp_path, shims, {})
    assert any("command not found" in p for p in problems([], result))
