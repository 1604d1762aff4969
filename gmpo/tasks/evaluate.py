"""Greedy held-out evaluation of a policy on a task dataset."""

import torch
from datasets import Dataset

from gmpo.tasks.rewards import char_accuracy_reward, exact_match_reward


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


def greedy_scores(model, tokenizer, dataset: Dataset, batch_size: int = 256) -> dict[str, float]:
    """Mean exact-match and per-character rewards of greedy completions over `dataset`.

    ``max_new_tokens`` is the longest answer (in characters, one token each) plus one for EOS.
    Returns ``{"exact_match": mean r_exact, "char_accuracy": mean r_char}``, both in [0, 1].
    """
    prompts, answers = list(dataset["prompt"]), list(dataset["answer"])
    max_new_tokens = max(len(a) for a in answers) + 1
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size)
    rewards = {"exact_match": exact_match_reward, "char_accuracy": char_accuracy_reward}
    return {name: sum(fn(completions, answers)) / len(answers) for name, fn in rewards.items()}


def greedy_accuracy(model, tokenizer, dataset: Dataset, batch_size: int = 256) -> float:
    """Fraction of `dataset` whose greedy completion exactly matches the answer."""
    return greedy_scores(model, tokenizer, dataset, batch_size)["exact_match"]
