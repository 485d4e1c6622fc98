"""What the command lines keep off the console. transformers (which mlx-lm and our tokenizers import) announces
at import that PyTorch is missing, though nothing here needs PyTorch: a user who did not ask for transformers
should not read about it. Only that note is dropped; its other warnings still show."""
import logging


class _NoTorchNote(logging.Filter):
    def filter(self, record):
        return "PyTorch was not found" not in record.getMessage()


def quiet_transformers():
    """Drops transformers' PyTorch note (before transformers is imported; idempotent)."""
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _NoTorchNote) for f in logger.filters):
        logger.addFilter(_NoTorchNote())
