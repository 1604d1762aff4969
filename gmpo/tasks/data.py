"""Synthetic tasks with verifiable answers, as `datasets.Dataset`s in TRL's "standard" prompt format.

Both tasks are character level (one token per character, see `gmpo.tasks.policy.build_tokenizer`):

* ``addition``: two-digit addition, ``a, b in [10, 99]``: prompt ``"37+45="``, answer ``"82"``
  (2-3 answer tokens + EOS).
* ``reverse``: a random string of 32-40 digits and ``">"``: prompt ``"0481...7>"``, answer the
  digits reversed ``"7...1840"`` (32-40 answer tokens + EOS), a task with long completions.

Split rule, shared by both tasks: a prompt is in the test split iff ``crc32(prompt) % 10 == 0``
(about 10% of the prompt space). The rule depends only on the prompt, so train and test are
disjoint for every size and seed.
"""

import zlib

import numpy as np
from datasets import Dataset

SPLITS = ("train", "test")
REVERSE_LENGTHS = (32, 40)  # inclusive range of the reversed string's length


def in_test_split(prompt: str) -> bool:
    """True iff ``crc32(prompt) % 10 == 0``: the prompt belongs to the held-out test split."""
    return zlib.crc32(prompt.encode()) % 10 == 0


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}; pass 'train' or 'test'.")


def addition_dataset(size: int, seed: int, split: str = "train") -> Dataset:
    """`size` rows ``{"prompt": "a+b=", "answer": str(a + b)}`` with ``a, b in [10, 99]``.

    The split's pool (about 7,290 train or 810 test pairs) is shuffled with `seed`, then repeated
    if `size` exceeds it, so every pair appears ``floor`` or ``ceil(size / len(pool))`` times.
    """
    _check_split(split)
    pool = [(a, b) for a in range(10, 100) for b in range(10, 100) if in_test_split(f"{a}+{b}=") == (split == "test")]
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-size // len(pool)))])[:size]
    pairs = [pool[i] for i in order]
    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]})


def reverse_dataset(size: int, seed: int, split: str = "train") -> Dataset:
    """`size` rows ``{"prompt": digits + ">", "answer": digits[::-1]}``, ``len(digits)`` uniform in 32..40.

    Strings are drawn with `seed` and rejected until they fall in `split` (the test split differs
    from train in the draw's seed, so the two splits do not repeat each other's draws either).
    """
    _check_split(split)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    prompts, answers = [], []
    while len(prompts) < size:
        digits = "".join(map(str, rng.integers(0, 10, size=rng.integers(REVERSE_LENGTHS[0], REVERSE_LENGTHS[1] + 1))))
        if in_test_split(digits + ">") == (split == "test"):
            prompts.append(digits + ">")
            answers.append(digits[::-1])
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


TASKS = {"addition": addition_dataset, "reverse": reverse_dataset}


def make_dataset(task: str, size: int, seed: int, split: str = "train") -> Dataset:
    """Dataset with columns ``prompt`` (str) and ``answer`` (str) for `task` in ``TASKS``."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {sorted(TASKS)}.")
    return TASKS[task](size, seed, split)
