"""Expected errors: the CLI prints their message and exits 2, without a traceback (unless --debug)."""

import reprlib


class DsvlmError(Exception):
    """An error the user can fix: bad recipe, missing file, bad data. The message says what to do."""


class RecipeError(DsvlmError):
    """A recipe that does not load or validate."""


class DataError(DsvlmError):
    """Input data that is missing, malformed or inconsistent."""


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
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def shorten(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters, for a user's name quoted as is (a key, an id) in an error message."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
