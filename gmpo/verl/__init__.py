"""GMPO for verl: the policy loss `loss_mode=gmpo`, registered in verl's policy-loss registry on import.

verl imports this module on `import verl` through the `verl.plugins` entry point of this package (in the driver and in
every Ray worker; `VERL_USE_EXTERNAL_PLUGINS=none` turns that off, and `VERL_USE_EXTERNAL_MODULES=gmpo.verl` loads it
explicitly). It imports only `gmpo.objective`, torch and verl: no TRL.
"""

from gmpo.verl.config import GMPOOptions, GMPOPolicyLossConfig, check_variant, gmpo_options
from gmpo.verl.loss import GMPO_LOSS_AGG_MODE, compute_policy_loss_gmpo, gmpo_metrics

__all__ = [
    "GMPO_LOSS_AGG_MODE",
    "GMPOOptions",
    "GMPOPolicyLossConfig",
    "check_variant",
    "compute_policy_loss_gmpo",
    "gmpo_metrics",
    "gmpo_options",
]
