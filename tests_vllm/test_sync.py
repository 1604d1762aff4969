"""The weight sync really moves vLLM's weights, on vLLM's CPU backend (where TRL's in-place load cannot work)."""

import torch
from peft import LoraConfig

from gmpo.trl.vllm_sync import needs_reload_sync

from .conftest import BF16_LOGP_TOL, engine_logps, model_logps, sequences, vllm_trainer


def mean_abs(a, b) -> float:
    return (a - b).abs().mean().item()


def perturb_and_sync(trainer, seqs, perturb):
    """vLLM's log-probs against the policy's before and after `perturb` (in place), before and after a sync."""
    before = model_logps(trainer.model, seqs)
    with torch.no_grad():
        perturb(trainer.model)
    after = model_logps(trainer.model, seqs)
    assert mean_abs(before, after) > 10 * BF16_LOGP_TOL, "the perturbation must move the log-probs measurably"
    stale = engine_logps(trainer, seqs)
    trainer.vllm_generation.sync_weights()
    synced = engine_logps(trainer, seqs)
    return before, after, stale, synced


def test_cpu_colocate_uses_the_reload_sync(trainer):
    assert needs_reload_sync(trainer.vllm_generation)
    assert trainer.vllm_generation.sync_weights.__func__.__name__ == "sync_by_reload"


def test_sync_moves_every_layer_including_the_tied_lm_head(trainer):
    seqs = sequences(trainer)
    assert trainer.model.config.tie_word_embeddings  # the shipped policy's LM head is its input embedding

    def mlp(model):
        for name, p in model.named_parameters():
            if "layers.1.mlp" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))

    def embedding(model):  # also the LM head: vLLM packs that one separately on CPU
        model.get_input_embeddings().weight.mul_(1.5)

    for perturb in (mlp, embedding):
        before, after, stale, synced = perturb_and_sync(trainer, seqs, perturb)
        assert mean_abs(stale, before) < BF16_LOGP_TOL, f"{perturb.__name__}: vLLM moved before the sync"
        assert mean_abs(synced, after) < BF16_LOGP_TOL, f"{perturb.__name__}: vLLM does not follow the sync"


def test_lora_merged_weights_reach_vllm(tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    trainer = vllm_trainer(tmp_path, peft_config=lora)
    seqs = sequences(trainer)

    def adapters(model):  # LoRA starts with B = 0; a nonzero B makes the adapted model differ from the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))

    before, after, stale, synced = perturb_and_sync(trainer, seqs, adapters)
    assert mean_abs(stale, before) < BF16_LOGP_TOL
    assert mean_abs(synced, after) < BF16_LOGP_TOL, "vLLM does not generate with the merged adapters"
    with trainer.model.disable_adapter():
        assert torch.allclose(model_logps(trainer.model, seqs), before)  # the sync unmerged the adapters again
