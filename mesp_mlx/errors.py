"""The errors a user can cause, at the bottom of the package so every layer can raise them. Each carries a
message that names the file (and line) or the setting and what was expected; the CLIs print it on one line and
exit with status 2, never with a traceback."""


class MespError(ValueError):
    """Anything the user can fix: a bad setting, file or data row."""


class ConfigError(MespError):
    """A setting (flag or recipe key) that cannot be used."""


class SourceError(MespError):
    """A model, data or adapter file that cannot be used."""


class DataError(MespError):
    """A data row or dataset that cannot be used."""
