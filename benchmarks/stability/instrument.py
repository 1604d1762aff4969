"""The same per-step instrumentation for trl.GRPOTrainer and gmpo.GMPOTrainer: a mixin over `_compute_loss`.

With gradient_accumulation_steps 1, each optimizer step computes the loss on exactly one micro-batch, so the
statistics of that micro-batch are the step's. Notation: B rows, T completion positions, mask (B, T) the valid
completion tokens, old = log pi_old (B, T) from generation time, logp = log pi_theta (B, T) of the current policy,
ref = log pi_init (B, T) of a frozen copy of the initial weights.

Per step the mixin records (all over the valid tokens of the whole micro-batch, every row):

* `log_ratio_max`, `log_ratio_min`: max / min of r = logp - old (log space; the paper's Fig. 1/3);
* `lag`: optimizer steps since this micro-batch was generated, `trainer._step % steps_per_generation` read before
  TRL increments it (0: the weights that sampled it, r = 0 up to float noise);
* `entropy`: mean token entropy of pi_theta (nats);
* `kl_init`: mean k3 estimate exp(d) - d - 1, d = ref - logp, of KL(pi_theta || pi_init) on the sampled tokens.

logp and the entropies are the tensors the parent's own forward computes (captured from
`_get_per_token_logps_and_entropies`), so the policy is not run twice; `ref` needs one extra forward of the frozen
copy under `torch.no_grad`, which touches no parameter, optimizer state or random stream of the trained policy.
Clip fractions and the gradient norm come from each trainer's own log (see `StepLog`).
"""

import copy

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from gmpo import GMPOTrainer


class StabilityProbe:
    """Mixin placed before the trainer class: records one dict per optimizer step in `self.probe_records`."""

    def setup_probe(self) -> None:
        self.probe_records: dict[int, dict] = {}
        self._probe_capture = None
        self._probe_reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        # Wrapped on the instance, after __init__: GMPOTrainer reads this method's signature in its constructor.
        self._probe_logps = self._get_per_token_logps_and_entropies

        def capture(*args, **kwargs):
            out = self._probe_logps(*args, **kwargs)
            if self._probe_capture is not None:
                self._probe_capture.append(out)
            return out

        self._get_per_token_logps_and_entropies = capture

    def _compute_loss(self, model, inputs):
        if not self.model.training:
            return super()._compute_loss(model, inputs)
        lag = self._step % self.args.steps_per_generation  # read before training_step increments _step
        self._probe_capture = []
        try:
            loss = super()._compute_loss(model, inputs)
            (logp, entropies, _), *_ = self._probe_capture
        finally:
            self._probe_capture = None
        self._record(inputs, logp.detach(), entropies.detach(), lag)
        return loss

    @torch.no_grad()
    def _record(self, inputs, logp, entropies, lag) -> None:
        mask = inputs["completion_mask"].bool()
        old = inputs.get("old_per_token_logps")
        old = logp if old is None else old
        log_ratio = (logp - old)[mask]
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        ref, _, _ = self._probe_logps(
            self._probe_reference,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            completion_ids.size(1),
        )
        d = (ref - logp)[mask]
        self.probe_records[self.state.global_step + 1] = {
            "lag": lag,
            "log_ratio_max": log_ratio.max().item(),
            "log_ratio_min": log_ratio.min().item(),
            "entropy": entropies[mask].mean().item(),
            "kl_init": (torch.exp(d) - d - 1).mean().item(),
            "tokens": int(mask.sum()),
        }


class ProbedGRPOTrainer(StabilityProbe, GRPOTrainer):
    pass


class ProbedGMPOTrainer(StabilityProbe, GMPOTrainer):
    pass


# Keys kept from the Trainer's per-step log. GRPO's clip_ratio/* are ratio-space token fractions (ratio outside
# (1 - epsilon, 1 + epsilon_high) on the side its advantage clips); GMPO's are log-space (token, or row with
# sequence-level clipping) fractions: r < -epsilon with A < 0, r > epsilon_high with A > 0.
LOGGED_KEYS = ("grad_norm", "reward", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


class StepLog(TrainerCallback):
    """Copies LOGGED_KEYS of every train log (logging_steps=1) into the probe record of the same step."""

    def __init__(self, records: dict[int, dict]):
        self.records = records

    def on_log(self, args, state, control, logs=None, **kwargs):
        row = self.records.setdefault(state.global_step, {})
        row.update({key: float(logs[key]) for key in LOGGED_KEYS if key in (logs or {})})
