"""Verifiable rewards with TRL's reward-function signature.

TRL calls ``reward(prompts=..., completions=..., completion_ids=..., **dataset_columns)``; the
``answer`` column arrives as a keyword. Completions are decoded after the prompt with special
tokens (EOS, padding) already removed.
"""


def exact_match_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """``r_i = 1[strip(completion_i) == strip(answer_i)]``, in {0.0, 1.0}."""
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answer, strict=True)]


def char_accuracy_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """Partial credit ``r_i = #{j : c_j == a_j} / max(|c|, |a|)`` in [0, 1] (after strip).

    Position-wise matches over the longer of the two strings, so a missing, extra or wrong
    character each cost ``1 / max(|c|, |a|)``; ``r_i = 1`` iff the exact match holds.
    """
    rewards = []
    for c, a in zip(completions, answer, strict=True):
        c, a = c.strip(), a.strip()
        rewards.append(sum(x == y for x, y in zip(c, a)) / max(len(c), len(a), 1))
    return rewards
