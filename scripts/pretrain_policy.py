"""Supervised pretraining of a tiny policy for a built-in task, stopped at partial accuracy.

The policy is trained with next-token cross-entropy on ``answer + <eos>`` given ``<bos> + prompt``
(the prompt tokens carry no loss) and stops as soon as its greedy score (`--metric`) on the
held-out test split reaches ``--target_accuracy``, so RL has room to improve it. Writes
``model.safetensors``, ``config.json``, ``generation_config.json`` and the tokenizer files.

    python scripts/pretrain_policy.py --task addition --output_dir gmpo/assets/addition \
        --target_accuracy 0.37 --eval_every 10
    python scripts/pretrain_policy.py --task reverse --output_dir gmpo/assets/reverse \
        --metric char_accuracy --target_accuracy 0.55 --eval_every 25 --eval_size 128 --batch_size 64
"""

import argparse
import random
import time

import numpy as np
import torch

from gmpo.tasks import build_model, build_tokenizer, greedy_scores, make_dataset

# --- arguments ---------------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--task", default="addition", choices=["addition", "reverse"])
parser.add_argument("--output_dir", required=True)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--target_accuracy", type=float, default=0.37, help="stop at this held-out greedy score")
parser.add_argument(
    "--metric", default="exact_match", choices=["exact_match", "char_accuracy"], help="greedy score to stop on"
)
parser.add_argument("--max_steps", type=int, default=5000)
parser.add_argument("--batch_size", type=int, default=128)
parser.add_argument("--learning_rate", type=float, default=1e-3)
parser.add_argument("--train_size", type=int, default=20_000)
parser.add_argument("--eval_size", type=int, default=512)
parser.add_argument("--eval_every", type=int, default=20)
parser.add_argument("--hidden_size", type=int, default=128)
parser.add_argument("--num_layers", type=int, default=2)
args = parser.parse_args()

# --- setup -------------------------------------------------------------------------------------
random.seed(args.seed)
np.random.seed(args.seed)
torch.manual_seed(args.seed)

tokenizer = build_tokenizer()
model = build_model(tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers)
print(f"{args.task}: {sum(p.numel() for p in model.parameters()):,} parameters")
train = make_dataset(args.task, args.train_size, args.seed, "train")
test = make_dataset(args.task, args.eval_size, args.seed, "test")

# Rows are <bos> prompt answer <eos>, right-padded; labels are -100 except on answer + <eos>.
prompt_ids = tokenizer(text=list(train["prompt"]))["input_ids"]
answer_ids = tokenizer(text=list(train["answer"]), add_special_tokens=False)["input_ids"]
width = max(len(p) + len(a) + 1 for p, a in zip(prompt_ids, answer_ids))
input_ids = torch.full((len(train), width), tokenizer.pad_token_id)
labels = torch.full((len(train), width), -100)
for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
    row = torch.tensor(p + a + [tokenizer.eos_token_id])
    input_ids[i, : len(row)] = row
    labels[i, len(p) : len(row)] = row[len(p) :]
attention_mask = (labels != -100) | (torch.arange(width) < torch.tensor([len(p) for p in prompt_ids])[:, None])

optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
generator = torch.Generator().manual_seed(args.seed)


# --- loop --------------------------------------------------------------------------------------
start = time.time()
model.train()
for step in range(1, args.max_steps + 1):
    idx = torch.randint(len(train), (args.batch_size,), generator=generator)
    loss = model(input_ids=input_ids[idx], attention_mask=attention_mask[idx].long(), labels=labels[idx]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % args.eval_every == 0:
        scores = greedy_scores(model, tokenizer, test)
        exact, char, elapsed = scores["exact_match"], scores["char_accuracy"], time.time() - start
        print(f"step {step:5d}  loss {loss.item():.4f}  test exact {exact:.3f}  char {char:.3f}  {elapsed:.0f}s")
        if scores[args.metric] >= args.target_accuracy:
            break

# --- report ------------------------------------------------------------------------------------
scores = greedy_scores(model, tokenizer, test)
print(f"stopped at step {step}: held-out greedy {scores} on {len(test)} test prompts")
model.save_pretrained(args.output_dir)
tokenizer.save_pretrained(args.output_dir)
print(f"wrote {args.output_dir}")
