"""Expected errors: the CLI prints their message and exits 2, without a traceback (unless --debug)."""


class DsvlmError(Exception):
    """An error the user can fix: bad recipe, missing file, bad data. The message says what to do."""


class RecipeError(DsvlmError):
    """A recipe that does not load or validate."""


class DataError(DsvlmError):
    """Input data that is missing, malformed or inconsistent."""
