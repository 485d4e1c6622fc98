"""Model sources, tokenizers, the per-layer weight store and adapter files."""


class SourceError(ValueError):
    """A model, data or adapter file that cannot be used; the message names the file and the problem."""
