"""Geometric-Mean Policy Optimization (arXiv 2507.20673): one pure-torch objective and an adapter per engine.

- `gmpo.objective`: the objective, a pure function of tensors (torch only).
- `gmpo.trl`: TRL's adapter, `GMPOConfig` and `GMPOTrainer` (the `trl` extra).
- `gmpo.verl`: verl's policy loss `loss_mode=gmpo` (the `verl` extra).
- `gmpo.cli` (`gmpo train`) and `gmpo.tasks` (the built-in tasks) run on TRL's adapter.

`import gmpo` loads only the objective; `gmpo.GMPOConfig` and `gmpo.GMPOTrainer` import TRL's adapter on first use
(PEP 562).
"""

import importlib

from .objective import GMPOOutput, GMPOStats, gmpo_objective

__all__ = ["GMPOConfig", "GMPOTrainer", "GMPOOutput", "GMPOStats", "gmpo_objective"]
__version__ = "0.1.0"

_TRL_EXPORTS = {"GMPOConfig": ".trl.config", "GMPOTrainer": ".trl.trainer"}


def missing_extra_message(err: ModuleNotFoundError, what: str, extra: str) -> str | None:
    """One line naming the extra that provides the module `err` could not find; None when the module is ours."""
    missing = (err.name or "").split(".")[0]
    if not missing or missing == __name__:
        return None
    return f"{what} needs the {extra!r} extra (module {missing!r} is not installed): pip install -e '.[{extra}]'"


def __getattr__(name: str):
    module = _TRL_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module, __name__), name)
    except ModuleNotFoundError as err:
        message = missing_extra_message(err, f"gmpo.{name}", "trl")
        if message is None:
            raise
        raise ModuleNotFoundError(message, name=err.name) from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
