"""Built-in synthetic tasks, their rewards and evaluation, and the tiny policies shipped for them."""

from gmpo.tasks.data import TASKS, in_test_split, make_dataset
from gmpo.tasks.evaluate import greedy_accuracy, greedy_completions, greedy_scores
from gmpo.tasks.policy import build_model, build_tokenizer, policy_path
from gmpo.tasks.rewards import char_accuracy_reward, exact_match_reward

__all__ = [
    "TASKS",
    "build_model",
    "build_tokenizer",
    "char_accuracy_reward",
    "exact_match_reward",
    "greedy_accuracy",
    "greedy_completions",
    "greedy_scores",
    "in_test_split",
    "make_dataset",
    "policy_path",
]
