"""The stale-sampler guard: does vLLM generate from the trainer's weights?

After every rollout generated with vLLM in colocate mode, the first `PROBE_ROWS` sequences (prompt + completion) of
each process are scored twice at temperature 1: by the vLLM engine that sampled them (its prompt log-probs, which
vLLM computes from the raw logits, before temperature, top-k / top-p / min-p, penalties or a structured-outputs
grammar) and by the policy (a plain forward in eval mode). The per-token difference

    d = mean over the scored tokens of |log p_vllm(x_t | x_<t) - log p_policy(x_t | x_<t)|

then depends on the two sets of weights and the two numeric precisions only, not on the sampling settings. It is
logged as `sampling/weights_logp_difference`; above `stale_sampler_threshold` the sampler is taken to run other
weights than the trainer's (a failed or skipped sync), and `stale_sampler_policy` says what happens: 'stop' raises
StaleSamplerError, 'warn' logs a warning, 'off' skips the check. The decision is taken on the difference pooled over
all processes, so every process takes the same one.
"""

import logging

import torch

logger = logging.getLogger(__name__)

STALE_SAMPLER_POLICIES = ("stop", "warn", "off")
PROBE_ROWS = 4  # sequences per process and rollout: a vLLM prefill and this many policy forwards


class StaleSamplerError(RuntimeError):
    """vLLM's log-probs show that it samples from other weights than the trainer's (stale_sampler_policy='stop')."""


def probe_sequences(output: dict, rows: int = PROBE_ROWS) -> list[list[int]]:
    """The unpadded prompt + completion token ids of the first `rows` rows of a rollout."""
    sequences = []
    for i in range(min(rows, output["prompt_ids"].size(0))):
        prompt = output["prompt_ids"][i][output["prompt_mask"][i].bool()]
        completion = output["completion_ids"][i][output["completion_mask"][i].bool()]
        sequences.append(torch.cat([prompt, completion]).tolist())
    return sequences


def sampler_logps(generation, sequences: list[list[int]]) -> list[torch.Tensor]:
    """log p(x_t | x_<t), t >= 1, of each sequence under the colocated vLLM engine: its prompt log-probs, from the raw
    logits. A greedy one-token request, so vLLM's sampling random state is not used."""
    from vllm import SamplingParams

    own = sequences
    if generation.tensor_parallel_size > 1:  # every rank of a tensor-parallel group must send the same requests
        gathered = [None] * generation.tensor_parallel_size
        torch.distributed.all_gather_object(gathered, sequences, group=generation.tp_group)
        sequences = [seq for part in gathered for seq in part]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = generation.llm.generate([{"prompt_token_ids": seq} for seq in sequences], sampling_params=params,
                                      use_tqdm=False)
    if generation.tensor_parallel_size > 1:
        start = torch.distributed.get_rank(group=generation.tp_group) * len(own)
        outputs = outputs[start:start + len(own)]
    return [
        torch.tensor([step[token].logprob for step, token in zip(out.prompt_logprobs[1:], seq[1:])])
        for out, seq in zip(outputs, own)
    ]


@torch.no_grad()
def policy_logps(model, accelerator, sequences: list[list[int]]) -> list[torch.Tensor]:
    """log p(x_t | x_<t), t >= 1, of each sequence under `model` at temperature 1, one sequence per forward, dropout
    off (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        result = []
        for seq in sequences:
            ids = torch.tensor([seq], device=accelerator.device)
            with accelerator.autocast():
                logits = model(input_ids=ids).logits
            logps = logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            result.append(logps.cpu())
        return result
    finally:
        model.train(was_training)


class StaleSamplerCheck:
    """Mixin for GRPOTrainer subclasses: the check above after every vLLM rollout, per `args.stale_sampler_policy`
    and `args.stale_sampler_threshold`. Active with use_vllm in colocate mode without sleep mode, on text inputs; the
    subclass sets `_check_sampler = self._stale_sampler_check_applies()` once built."""

    def _stale_sampler_check_applies(self) -> bool:
        args = self.args
        if not self.use_vllm or args.stale_sampler_policy == "off":
            return False
        if args.vllm_mode != "colocate" or args.vllm_enable_sleep_mode:
            # Server mode has no prompt log-probs in TRL's client; sleep mode discards vLLM's weights after each
            # rollout, so a probe would have to push them again.
            logger.info("the stale-sampler check runs only in colocate mode without sleep mode: not checked")
            return False
        return True

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self._check_sampler and "pixel_values" not in output:
            self._check_sampler_weights(output)
        return output

    def _check_sampler_weights(self, output: dict) -> None:
        sequences = probe_sequences(output)
        from_sampler = sampler_logps(self.vllm_generation, sequences)
        from_policy = policy_logps(self.model, self.accelerator, sequences)
        abs_diff = torch.cat([(s - p).abs() for s, p in zip(from_sampler, from_policy)])
        device = self.accelerator.device
        totals = self.accelerator.reduce(torch.tensor([abs_diff.sum().item(), abs_diff.numel()], device=device,
                                                      dtype=torch.float64), reduction="sum")
        difference = (totals[0] / totals[1].clamp(min=1)).item()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["sampling/weights_logp_difference"].append(difference)
        threshold = self.args.stale_sampler_threshold
        if difference <= threshold:
            return
        message = (
            f"vLLM does not sample from the trainer's weights at step {self.state.global_step}: its log-probs differ "
            f"from the policy's by {difference:.3g} per token on average (temperature 1, {int(totals[1].item())} "
            f"tokens), above stale_sampler_threshold={threshold:g}; the weight sync failed or was skipped"
        )
        if self.args.stale_sampler_policy == "stop":
            raise StaleSamplerError(message + " (stale_sampler_policy='stop'; 'warn' trains on)")
        logger.warning(message + " (stale_sampler_policy='warn': training goes on)")
