"""`python -m mesp_mlx.train`: the command line over `Trainer` (thin by design)."""
import sys


def main(argv=None):
    from .blas import ensure_fast_blas
    from .console import quiet_transformers
    ensure_fast_blas()
    quiet_transformers()
    from .config import config_from_args
    from .errors import MespError
    from .trainer import Trainer
    try:
        trainer = Trainer(config_from_args(argv))
        trainer.run()
        if trainer.stop_signal is not None:
            return 128 + trainer.stop_signal
    except (MespError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
