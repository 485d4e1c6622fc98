"""Model sources, tokenizers, the per-layer weight store and adapter files."""
from ..errors import SourceError  # noqa: F401  (io's own error, re-exported for its callers)
