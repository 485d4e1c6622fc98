"""Training objectives behind one interface (base.py) and one table. Adding an objective is its own module and
one line here: the trainer, the engines and the memory planner ask the objective, never its name."""
from .base import Batch, Objective, Rollout
from .grpo import GRPO
from .kto import KTO
from .preference import DPO, ORPO
from .sft import SFT

OBJECTIVES = {"sft": SFT, "dpo": DPO, "orpo": ORPO, "kto": KTO, "grpo": GRPO}
__all__ = ["DPO", "GRPO", "KTO", "OBJECTIVES", "ORPO", "SFT", "Batch", "Objective", "Rollout", "make_objective"]


def make_objective(config):
    """The objective of a run's settings (`--loss`), its settings checked."""
    return OBJECTIVES[config.loss].from_config(config)
