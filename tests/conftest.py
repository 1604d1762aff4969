"""One tiny causal LM and character tokenizer, built once per session and saved like a hub checkpoint."""

import random

import pytest
import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

from gmpo import GMPOConfig, GMPOTrainer

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
CHARS = list("0123456789+=-* abcdefghij")


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        padding_side="left", truncation_side="left",
    )


def save_model_dir(tmp_path_factory, name: str, model_class, config, seed: int = 0) -> str:
    """`model_class(config)` initialised with `seed`, saved with the character tokenizer like a hub checkpoint."""
    path = tmp_path_factory.mktemp(name)
    torch.manual_seed(seed)
    model_class(config).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    return save_model_dir(tmp_path_factory, "tiny-llama", LlamaForCausalLM, config)


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """A one-layer Mixtral with router aux loss coefficient 0.02, for the MoE aux-loss paths."""
    config = MixtralConfig(vocab_size=len(build_tokenizer()), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           router_aux_loss_coef=0.02, output_router_logits=True)
    return save_model_dir(tmp_path_factory, "tiny-moe", MixtralForCausalLM, config)


@pytest.fixture(scope="session")
def prompt_dataset():
    rng = random.Random(0)
    return Dataset.from_dict({"prompt": [f"{rng.randint(10, 99)}+{rng.randint(10, 99)}=" for _ in range(64)]})


def count_ones_reward(completions, **kwargs):
    """A reward with spread inside every group: how many '1' characters the completion has."""
    return [float(c.count("1")) for c in completions]


def tiny_config(output_dir, **overrides) -> GMPOConfig:
    """GMPOConfig shrunk for CPU tests; off-policy by default so the clip can act."""
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,  # fp32 on CPU: exact comparisons, no autocast
        gradient_checkpointing=False,  # 2-layer model: checkpointing only slows it down
        per_device_train_batch_size=8,  # two prompts x num_generations
        num_generations=4,
        max_completion_length=6,  # short rows keep generation cheap
        steps_per_generation=2,  # > gradient_accumulation_steps: an optimizer step between generation and use
        max_steps=4,
        learning_rate=0.05,  # large on purpose, so the ratios move past exp(+-epsilon) within a few steps
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    settings.update(overrides)
    return GMPOConfig(**settings)


@pytest.fixture
def trainer(tiny_model_dir, prompt_dataset, tmp_path):
    t = GMPOTrainer(model=tiny_model_dir, reward_funcs=count_ones_reward, args=tiny_config(tmp_path),
                    train_dataset=prompt_dataset)
    t.model.double()  # float64 weights; only the log-probs pass through float32 (TRL's fused LM head)
    t.model.train()  # from_pretrained leaves the model in eval mode; the loss reads the mode from it
    t.current_gradient_accumulation_steps = 1
    return t
