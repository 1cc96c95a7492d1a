"""Command-line interface (Typer). Each command module is a thin wrapper over library functions."""
