"""What a run adds to the trainers through public hooks: evaluation at fixed points of the generation budget (a
TrainerCallback) and a sampler whose weights are rounded to bf16 (TRL's `rollout_func`)."""

import time

import torch
from transformers import TrainerCallback

from benchmarks.reuse import protocol
from gmpo.tasks import greedy_scores


class EvalPoints(TrainerCallback):
    """Held-out greedy scores after the rollouts in `at`, with the training time so far (evaluation excluded) and
    the completions and completion tokens generated so far."""

    def __init__(self, trainer, tokenizer, test, sched: protocol.Schedule, at: tuple[int, ...]):
        self.trainer, self.tokenizer, self.test, self.sched, self.at = trainer, tokenizer, test, sched, at
        self.points, self.eval_s, self.start = [], 0.0, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        per_rollout = self.sched.updates
        rollout = state.global_step // per_rollout
        if state.global_step % per_rollout or rollout not in self.at:
            return
        train_s = time.perf_counter() - self.start - self.eval_s
        # each completion is in one update per pass: the probe's token counts over all steps / num_iterations
        tokens = sum(r.get("tokens", 0) for r in self.trainer.probe_records.values()) // self.sched.num_iterations
        t0 = time.perf_counter()
        scores = greedy_scores(self.trainer.model, self.tokenizer, self.test)
        self.eval_s += time.perf_counter() - t0
        self.points.append({"rollout": rollout, "step": state.global_step, "tokens": tokens,
                            "completions": protocol.completions_sampled(self.sched, rollout),
                            "train_s": round(train_s, 2), **scores})


class Bf16Sampler:
    """TRL `rollout_func`: samples each rollout from a bf16 copy of the trained fp32 policy (weights rounded to bf16,
    activations computed in bf16), the way an inference engine serving bf16 weights differs from the trainer.

    Returns one completion per prompt entry (TRL's sampler already repeats each prompt num_generations times),
    cut after the first EOS, with the sampler's own token log-probs (log space, after temperature). Records per
    rollout the mismatch d = log pi_sampler - log pi_trained on the sampled tokens: mean |d| and max |d|.
    """

    def __init__(self):
        self.copy, self.stats = None, []

    @torch.no_grad()
    def __call__(self, prompts: list[str], trainer) -> dict:
        model, tokenizer = trainer.model, trainer.processing_class
        if self.copy is None:  # built from the config: a deepcopy would share the prepared model's patched forward
            self.copy = type(model)(model.config).to(torch.bfloat16).eval()
            self.copy.generation_config = model.generation_config
        self.copy.load_state_dict(model.state_dict())  # cast to bf16 on copy
        batch = tokenizer(text=prompts, padding=True, padding_side="left", return_tensors="pt")
        out = self.copy.generate(**batch, generation_config=trainer.generation_config, return_dict_in_generate=True,
                                 output_scores=True)
        width = batch["input_ids"].size(1)
        completion = out.sequences[:, width:]
        logps = torch.stack(out.scores, dim=1).float().log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        is_eos = completion == tokenizer.eos_token_id
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completion.size(1))
        mask = torch.arange(completion.size(1)) < lengths.unsqueeze(1)
        was_training = model.training
        model.eval()
        logits = model(input_ids=out.sequences, attention_mask=torch.cat([batch["attention_mask"], mask.long()], 1)
                       ).logits[:, width - 1 : -1] / trainer.temperature
        model.train(was_training)
        trained = logits.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        d = (logps - trained)[mask].abs()
        self.stats.append({"mean_abs": d.mean().item(), "max_abs": d.max().item()})
        prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
        return {"prompt_ids": prompt_ids,
                "completion_ids": [c[:n].tolist() for c, n in zip(completion, lengths.tolist())],
                "logprobs": [lp[:n].tolist() for lp, n in zip(logps, lengths.tolist())]}
