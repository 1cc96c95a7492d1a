"""`dsvlm prepare`: validated, prepared datasets."""

import typer

app = typer.Typer(help="Prepare datasets: LLaVA-format JSON, a hub dataset, or the built-in synthetic set.",
                  no_args_is_help=True)
