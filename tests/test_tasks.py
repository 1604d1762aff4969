"""Built-in tasks: datasets and splits, rewards, tokenizer, and the shipped addition policy."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gmpo.tasks import (
    build_tokenizer,
    char_accuracy_reward,
    exact_match_reward,
    greedy_accuracy,
    greedy_completions,
    greedy_scores,
    in_test_split,
    make_dataset,
    policy_path,
)

ALL_PAIRS = 90 * 90  # a, b in [10, 99]


@pytest.fixture(scope="module")
def policy():
    path = policy_path("addition")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


# --- datasets ----------------------------------------------------------------------------------


def test_addition_dataset_columns_and_answers():
    ds = make_dataset("addition", 100, seed=0, split="train")
    assert ds.column_names == ["prompt", "answer"] and len(ds) == 100
    for prompt, answer in zip(ds["prompt"], ds["answer"]):
        a, b = prompt.removesuffix("=").split("+")
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99 and answer == str(int(a) + int(b)), (prompt, answer)


def test_addition_splits_partition_the_pair_space():
    # A size above each pool returns the whole pool (then repeats), so these sets are the pools.
    train = set(make_dataset("addition", ALL_PAIRS, seed=0, split="train")["prompt"])
    test = set(make_dataset("addition", ALL_PAIRS, seed=0, split="test")["prompt"])
    assert not train & test, f"{len(train & test)} prompts are in both splits"
    assert len(train | test) == ALL_PAIRS
    assert 0.07 < len(test) / ALL_PAIRS < 0.13, f"test split holds {len(test)} of {ALL_PAIRS} pairs"


def test_dataset_is_seeded():
    assert make_dataset("addition", 50, seed=3)["prompt"] == make_dataset("addition", 50, seed=3)["prompt"]
    assert make_dataset("addition", 50, seed=3)["prompt"] != make_dataset("addition", 50, seed=4)["prompt"]


def test_reverse_dataset():
    train = make_dataset("reverse", 200, seed=0, split="train")
    test = make_dataset("reverse", 200, seed=0, split="test")
    for prompt, answer in zip(train["prompt"], train["answer"]):
        assert prompt.endswith(">") and answer == prompt[:-1][::-1] and 32 <= len(answer) <= 40
    assert all(in_test_split(p) for p in test["prompt"]) and not any(in_test_split(p) for p in train["prompt"])


@pytest.mark.parametrize("task, split", [("addition", "valid"), ("multiplication", "train")])
def test_make_dataset_rejects_unknown_names(task, split):
    with pytest.raises(ValueError, match="is not one of"):
        make_dataset(task, 10, seed=0, split=split)


# --- rewards -----------------------------------------------------------------------------------


def test_exact_match_reward():
    completions = ["82", " 82\n", "8", "820", "", "28"]
    assert exact_match_reward(completions, answer=["82"] * 6, prompts=["37+45="] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_char_accuracy_reward():
    completions = ["82", "83", "8", "820", "", "28", "4321"]
    answers = ["82"] * 6 + ["4331"]
    # matches / max(len): 2/2, 1/2, 1/2, 2/3, 0/2, 0/2, 3/4
    expected = [1.0, 0.5, 0.5, 2 / 3, 0.0, 0.0, 0.75]
    assert char_accuracy_reward(completions, answer=answers) == pytest.approx(expected)


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_left_padding(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer(text=["37+45="])["input_ids"][0]
    # One token per character after the <bos> that TRL's `tokenizer(text=prompts)` adds.
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 1 + len("37+45=")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "37+45="
    assert tokenizer.decode(tokenizer("0123456789+=> ", add_special_tokens=False)["input_ids"]) == "0123456789+=> "
    batch = tokenizer(text=["3+4=", "37+45="], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, :2].tolist() == [tokenizer.pad_token_id] * 2, "padding is not on the left"
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]


# --- shipped policy ----------------------------------------------------------------------------


def test_shipped_policy_stops_at_eos(policy):
    model, tokenizer = policy
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_shipped_policy_has_partial_greedy_accuracy(policy):
    # scripts/pretrain_policy.py stopped at 0.383 on these 512 test prompts; RL needs room above it.
    accuracy = greedy_accuracy(*policy, make_dataset("addition", 512, seed=0, split="test"))
    assert 0.25 <= accuracy <= 0.55, f"held-out greedy accuracy {accuracy:.3f} is outside the documented band"


def test_shipped_reverse_policy_has_partial_char_accuracy():
    # Pretraining stopped at char accuracy 0.572 (exact match 0.0) on these 128 test prompts.
    path = policy_path("reverse")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    scores = greedy_scores(model, tokenizer, make_dataset("reverse", 128, seed=0, split="test"))
    assert 0.4 <= scores["char_accuracy"] <= 0.75, f"held-out greedy scores {scores} are outside the documented band"
    assert scores["exact_match"] <= 0.1, f"held-out greedy scores {scores}: exact match leaves RL no room"


def test_greedy_completions_do_not_depend_on_left_padding(policy):
    model, tokenizer = policy
    prompts = ["3+4=", "37+45=", "9+91=", "12+5="]
    batched = greedy_completions(model, tokenizer, prompts, max_new_tokens=4)
    alone = [greedy_completions(model, tokenizer, [p], max_new_tokens=4)[0] for p in prompts]
    assert batched == alone


def test_sampled_groups_have_reward_variance(policy):
    # GRPO needs groups of 8 samples (temperature 1) with both right and wrong answers.
    model, tokenizer = policy
    ds = make_dataset("addition", 64, seed=0, split="test")
    batch = tokenizer(text=list(ds["prompt"]), return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **batch, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=4, num_return_sequences=8
        )
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    rewards = torch.tensor(exact_match_reward(completions, [a for a in ds["answer"] for _ in range(8)])).view(64, 8)
    mixed = (rewards.std(dim=1) > 0).float().mean().item()
    assert mixed >= 0.3, f"only {mixed:.2f} of groups have both right and wrong samples"
