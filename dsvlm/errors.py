"""Expected errors: the CLI prints their message without a traceback (unless --debug) and exits with the
error's `exit_code`: 2 when the cause is the user's input, 1 when accepted work failed. Anything else (a bug)
ends with its traceback and exit 1."""

import reprlib


class DsvlmError(Exception):
    """An error in the user's input: bad command line, recipe, data or paths. The message says what to fix."""

    exit_code = 2


class RecipeError(DsvlmError):
    """A recipe that does not load or validate."""


class DataError(DsvlmError):
    """Input data that is missing, malformed or inconsistent."""


class RunFailure(DsvlmError):
    """Accepted work that failed: the loss diverged, a disk filled up mid-run, an output did not verify. The
    message says what is left (e.g. a checkpoint to resume from) and what to try."""

    exit_code = 1


def brief(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to about `limit` characters. Error messages quote user values (a recipe field, a record
    id), which can be megabytes or deeply nested: a message must stay one readable line."""
    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = limit
    shortener.maxlevel = 3
    try:
        text = shortener.repr(value)
    except Exception:  # e.g. an int too long to print (ValueError), a self-containing value
        text = f"<{type(value).__name__}>"
    return shorten(text, limit)


def shorten(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters, for a user's name quoted as is (a key, an id) in an error message."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
