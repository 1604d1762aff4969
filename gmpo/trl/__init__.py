"""GMPO for TRL: `GMPOConfig(trl.GRPOConfig)` and `GMPOTrainer(trl.GRPOTrainer)`, whose loss is `gmpo_objective`.

The trainer gathers what GRPOTrainer computed, calls the objective and applies the GRPO options that are not GMPO's
(masks, IS correction, KL, entropy bonus); the other modules serve it: `metrics` (one-collective statistics),
`guards` (non-finite gradients, reward errors), `checkpoint`, `resume_state` and `resumable` (exact resume). Imports
only `gmpo.objective`, its own modules and the TRL stack (trl, transformers, accelerate, safetensors).
"""

from gmpo.trl.config import GMPOConfig
from gmpo.trl.trainer import GMPOTrainer

__all__ = ["GMPOConfig", "GMPOTrainer"]
