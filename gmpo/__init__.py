"""Geometric-Mean Policy Optimization (arXiv 2507.20673) on top of TRL."""

from .config import GMPOConfig
from .objective import GMPOOutput, GMPOStats, gmpo_objective
from .trainer import GMPOTrainer

__all__ = ["GMPOConfig", "GMPOTrainer", "GMPOOutput", "GMPOStats", "gmpo_objective"]
__version__ = "0.1.0"
