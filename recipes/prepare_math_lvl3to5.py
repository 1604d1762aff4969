"""Turn the paper's training set (MATH levels 3-5, 8,523 problems) into a dataset `gmpo train` reads.

The GMPO paper trains on Dr. GRPO's `math_lvl3to5_8k` (github.com/sail-sg/understand-r1-zero,
datasets/train/math_lvl3to5_8k: a `save_to_disk` directory with `problem` and `answer` columns). This writes
`prompt` (the Qwen-Math system prompt and the problem, as chat messages; Qwen2.5-Math's chat template renders them
as the paper's "qwen_math" template) and `solution` (the answer in \\boxed{}, what trl.rewards.accuracy_reward
parses), keeping the other columns.

    git clone https://github.com/sail-sg/understand-r1-zero
    python recipes/prepare_math_lvl3to5.py understand-r1-zero/datasets/train/math_lvl3to5_8k data/math_lvl3to5_8k
"""

import argparse

from datasets import DatasetDict, load_from_disk

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def to_prompt(row: dict) -> dict:
    return {
        "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["problem"]}],
        "solution": f"\\boxed{{{row['answer']}}}",
    }


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("source", help="save_to_disk directory with `problem` and `answer` columns")
parser.add_argument("output", help="where to save the converted dataset (pass it as --dataset_name)")
args = parser.parse_args()

data = load_from_disk(args.source)
if not isinstance(data, DatasetDict):
    data = DatasetDict({"train": data})
data = data.map(to_prompt)
data.save_to_disk(args.output)
print({split: len(rows) for split, rows in data.items()}, "->", args.output)
