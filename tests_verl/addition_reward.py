"""verl's custom reward function for the addition task: `reward.custom_reward_function.path=<this file>`."""

from gmpo.tasks.rewards import exact_match_reward


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """1.0 iff the completion is the sum; spaces are removed first (the character tokenizer decodes "82" as "8 2")."""
    return exact_match_reward([solution_str.replace(" ", "")], [ground_truth])[0]
