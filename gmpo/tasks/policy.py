"""The tiny character-level tokenizer and causal LM, and the policies shipped in ``gmpo/assets``."""

import importlib.resources
import pathlib

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = "0123456789+=> "


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of ``CHARACTERS``; ``tokenizer(text)`` prepends ``<bos>``.

    TRL's GRPOTrainer encodes string prompts with ``tokenizer(text=prompts)`` (special tokens on),
    so the BOS is part of every prompt in pretraining, evaluation and RL alike. Decoding fuses the
    characters back without separators. Padding and truncation are on the left.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        truncation_side="left",
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 128,
) -> LlamaForCausalLM:
    """A randomly initialised Llama (RoPE, tied embeddings; ~0.4M parameters at the defaults).

    The generation config stops at ``<eos>`` and pads with ``<pad>``, so ``generate`` and TRL agree.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def policy_path(task: str) -> pathlib.Path:
    """Directory of the policy shipped for `task` (``gmpo/assets/<task>``), loadable offline with
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``."""
    path = importlib.resources.files("gmpo") / "assets" / task
    if not path.is_dir():
        raise ValueError(f"task={task!r} has no shipped policy; expected a directory at {path}.")
    return pathlib.Path(str(path))
