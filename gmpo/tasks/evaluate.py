"""Greedy held-out evaluation of a policy on a task dataset."""

from collections.abc import Callable

import torch
from datasets import Dataset

from gmpo.tasks.rewards import exact_match_reward


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """Greedy (``do_sample=False``) completions of `prompts`, decoded up to the first EOS.

    Prompts are encoded as in TRL's GRPOTrainer (``tokenizer(text=prompts)``, so with the BOS the
    tokenizer adds) and left-padded; special tokens are dropped from the decoded text.
    """
    was_training = model.training
    model.eval()
    completions = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            text=prompts[start : start + batch_size], padding=True, padding_side="left", return_tensors="pt"
        )
        batch = batch.to(model.device)
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
        for ids in out[:, batch["input_ids"].shape[1] :].tolist():
            ids = ids[: ids.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ids else ids
            completions.append(tokenizer.decode(ids, skip_special_tokens=True))
    model.train(was_training)
    return completions


def greedy_accuracy(
    model, tokenizer, dataset: Dataset, batch_size: int = 256, reward: Callable = exact_match_reward
) -> float:
    """Mean `reward` of greedy completions over `dataset` (default: fraction exactly correct).

    ``max_new_tokens`` is the longest answer (in characters, one token each) plus one for EOS.
    Pass ``reward=char_accuracy_reward`` for the per-character partial credit.
    """
    prompts, answers = list(dataset["prompt"]), list(dataset["answer"])
    max_new_tokens = max(len(a) for a in answers) + 1
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size)
    rewards = reward(completions=completions, answer=answers)
    return sum(rewards) / len(rewards)
