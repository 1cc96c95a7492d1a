"""The `dsvlm` command: a thin Typer layer over the library functions.

Expected errors (DsvlmError) print one line-block message and exit with their code: 2 for a user error, 1 for
a failure (RunFailure); anything unexpected ends with its traceback and exit 1. `--debug` shows every traceback.
Logs and progress go to stderr; stdout carries only what a pipeline consumes.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import click
import typer
from typer.core import TyperGroup

from dsvlm import __version__
from dsvlm.cli import ablate as ablate_cli
from dsvlm.cli import common
from dsvlm.cli import evaluate as evaluate_cli
from dsvlm.cli import prepare as prepare_cli
from dsvlm.cli import pretrain as pretrain_cli
from dsvlm.cli import probe as probe_cli
from dsvlm.cli import recipe as recipe_cli
from dsvlm.cli import strip as strip_cli
from dsvlm.cli import train as train_cli

# `dsvlm --help` lists the commands in the order of the lifecycle, then the tools around it.
LIFECYCLE = ("prepare", "pretrain-diffusion", "train", "strip", "eval", "ablate", "probe", "recipe")


class _Commands(TyperGroup):
    """The root command group: an expected error ends any command with its message and its exit code, here
    rather than in `main`, so that in-process runs (tests, typer's CliRunner) see exactly what users see."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda name: LIFECYCLE.index(name) if name in LIFECYCLE else len(LIFECYCLE))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _results_on_stdout(command)
        return command

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except common.DsvlmError as exc:
            if common.STATE.debug:
                raise
            common.console.print(f"[bold red]error:[/] {common.escape(_own_message(exc))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from exc


def _results_on_stdout(command: click.Command) -> None:
    """While a command runs, stdout carries only its results (`common.emit`): what libraries print there
    (DeepSpeed's logger, lmms-eval's task reports) goes to stderr. Help and usage still go to stdout."""
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            _results_on_stdout(sub)
        return
    if getattr(command, "_results_on_stdout", False):  # wrapped once already: a second wrap would emit to stderr
        return
    invoke = command.invoke

    def invoke_with_results_on_stdout(ctx: click.Context) -> object:
        common.STATE.results = sys.stdout
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return invoke(ctx)
        finally:
            common.STATE.results = None

    command.invoke = invoke_with_results_on_stdout  # type: ignore[method-assign]
    command._results_on_stdout = True  # type: ignore[attr-defined]


def _own_message(exc: common.DsvlmError) -> str:
    """The error's message. One raised in a DataLoader worker comes back re-created by torch with the worker's
    traceback as its message; its last lines, after the exception's name, are the message itself."""
    message = str(exc)
    name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    if "Original Traceback" in message and name in message:
        return message.rsplit(name, 1)[1].strip()
    return message


app = typer.Typer(
    cls=_Commands,
    name="dsvlm",
    help="Train LLaVA-style VLMs with diffusion supervision (DS-VLM): prepare -> train -> strip -> eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsvlm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    common.STATE.debug = debug
    common.setup_logging(logging.DEBUG if debug else logging.INFO)


app.add_typer(recipe_cli.app, name="recipe")
app.add_typer(prepare_cli.app, name="prepare")
pretrain_cli.register(app)
train_cli.register(app)
strip_cli.register(app)
evaluate_cli.register(app)
probe_cli.register(app)
ablate_cli.register(app)


def main() -> None:
    """Console entry point."""
    app()
