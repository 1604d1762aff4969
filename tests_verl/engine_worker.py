"""One mini-batch through verl's FSDP engine on CPU, gradient vs a float64 whole-batch reference (one process per rank).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests_verl/engine_worker.py MODEL_DIR OUT_JSON

MODEL_DIR gets a tiny randomly initialised Qwen2 (seed 0, built here: no download) unless it already holds one.

Each rank builds verl's `FSDPEngineWithLMHead` (FSDP2, fp32, gloo; FSDP1 needs a GPU to sync module states) on the
tiny model in MODEL_DIR, takes its half of a seeded mini-batch of N rows (in verl's no-padding layout, made by verl's `left_right_2_no_padding`) and calls the
engine's `forward_backward_batch` with verl's `ppo_loss`, as verl's actor update does: verl splits the rows into
micro-batches (`prepare_micro_batches`: fixed `micro_batch_size_per_gpu`, or dynamic batching by token count),
back-propagates each micro-batch's loss and averages the gradients over the ranks. Rank 0 writes, per case, the
relative error ||g_engine - g_ref|| / ||g_ref|| of the full (unsharded) gradient and the rows of every micro-batch.

The reference is the whole mini-batch in float64, one forward per row, through the same weights:
    GMPO (Eq. 4):  L = -(1/N) sum_i A_i w_i,   w_i = exp(mean_t min(c_it, log delta)) * (prod_t u_it)^(1/|o_i|)
                   c_it = min(r_it, eps_high) if A_i > 0 else max(r_it, -eps_low),  r_it = log pi - log pi_old
    PPO (verl's vanilla loss, seq-mean-token-mean): L = (1/N) sum_i mean_t l_it,
                   l_it = max(-A_i rho_it, -A_i clip(rho_it, 1 - eps, 1 + eps)), for A_i < 0 capped at -A_i delta
"""

import json
import math
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_platform import use_cpu_platform  # noqa: E402
from reference import reference_loss  # noqa: E402

ROWS, PROMPT, RESPONSE, VOCAB = 16, 4, 10, 64  # N rows over all ranks; max prompt and response lengths
STRATEGY = "fsdp2"  # FSDP1 needs a GPU: its sync_module_states refuses CPU parameters
EPS, DUAL_CLIP = 0.4, 3.0  # GMPO's log-space bounds (paper); verl's default clip_ratio_c
# (micro_batch_size_per_gpu, use_dynamic_bsz); 16 tokens per micro-batch splits a rank's 8 rows unevenly
SPLITS = {"1": (8, False), "2": (4, False), "4": (2, False), "8": (1, False), "dynamic": (8, True)}
MAX_TOKENS_PER_MICRO_BATCH = 16


def make_batch(seed: int, dual: bool) -> dict:
    """Rows of random prompt lengths and short or long responses, advantages A_i, log-ratios r_it = -offset_it.

    dual=True: the rows with A_i < 0 get ratios up to e^1.6 (past the dual clip's 3 = e^1.1) and every token an
    IS weight u_it in [0.5, 1.5].
    """
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(2, PROMPT + 1, (ROWS,), generator=g)
    # short and long rows, so that dynamic batching's token budget gives micro-batches of unequal row counts
    response_len = torch.tensor([1, 2, RESPONSE - 1, RESPONSE])[torch.randint(0, 4, (ROWS,), generator=g)]
    cols_p, cols_r = torch.arange(PROMPT), torch.arange(RESPONSE)
    prompt_mask = (cols_p >= PROMPT - prompt_len[:, None]).long()  # left-padded, as verl's rollout returns them
    response_mask = (cols_r < response_len[:, None]).long()
    prompts = torch.randint(1, VOCAB, (ROWS, PROMPT), generator=g) * prompt_mask
    responses = torch.randint(1, VOCAB, (ROWS, RESPONSE), generator=g) * response_mask
    advantages = torch.randn(ROWS, generator=g)
    offset = (torch.rand(ROWS, RESPONSE, generator=g) * 2 - 1) * 0.9
    is_weights = None
    if dual:
        offset = torch.where((advantages < 0)[:, None], -1.6 * torch.rand(ROWS, RESPONSE, generator=g), offset)
        is_weights = 0.5 + torch.rand(ROWS, RESPONSE, generator=g)
    return dict(prompts=prompts, responses=responses, prompt_mask=prompt_mask, response_mask=response_mask,
                advantages=advantages, offset=offset, is_weights=is_weights)


def row_log_probs(model, batch: dict) -> list[torch.Tensor]:
    """log pi(o_it) of each row's response tokens, one unpadded forward per row."""
    out = []
    for i in range(ROWS):
        prompt = batch["prompts"][i][batch["prompt_mask"][i] > 0]
        response = batch["responses"][i][batch["response_mask"][i] > 0]
        logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0, len(prompt) - 1 : -1]
        out.append(torch.log_softmax(logits, -1).gather(-1, response[:, None])[:, 0])
    return out


def gmpo_reference(rows: list) -> torch.Tensor:
    """-(1/N) sum_i A_i w_i, the shared float64 loop of tests_verl/reference.py (token clip, verl's dual clip)."""
    return reference_loss(rows, EPS, EPS, delta=DUAL_CLIP)


def ppo_reference(rows: list) -> torch.Tensor:
    """(1/N) sum_i mean_t l_it: verl's vanilla clip in ratio space, with its dual clip for A_i < 0."""
    total = 0.0
    for log_prob, old, adv, _ in rows:
        ratio = (log_prob - old).exp()
        loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - EPS, 1 + EPS))
        total = total + (loss.clamp(max=-adv * DUAL_CLIP) if adv < 0 else loss).mean()
    return total / len(rows)


def reference_grad(model, batch: dict, old: torch.Tensor, reference) -> dict:
    """Gradient of the whole mini-batch's reference loss, float64, one (log_prob, old, A_i, u_i) tuple per row."""
    model.zero_grad()
    rows = []
    for i, log_prob in enumerate(row_log_probs(model, batch)):
        n = len(log_prob)
        is_w = None if batch["is_weights"] is None else batch["is_weights"][i, :n].double()
        rows.append((log_prob, old[i, :n].double(), float(batch["advantages"][i]), is_w))
    reference(rows).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def rank_data(batch: dict, old: torch.Tensor, rank: int, world: int):
    """This rank's rows, in verl's no-padding layout."""
    from tensordict import TensorDict
    from verl.workers.utils.padding import left_right_2_no_padding

    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    mask = batch["response_mask"][rows]
    attention_mask = torch.cat([batch["prompt_mask"][rows], mask], 1)
    fields = dict(
        prompts=batch["prompts"][rows], responses=batch["responses"][rows],
        input_ids=torch.cat([batch["prompts"][rows], batch["responses"][rows]], 1), attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0), response_mask=mask, old_log_probs=old[rows],
        advantages=batch["advantages"][rows, None] * mask,  # (B, T), as verl's GRPO advantage estimator gives it
    )
    if batch["is_weights"] is not None:
        fields["rollout_is_weights"] = batch["is_weights"][rows] * mask
    return left_right_2_no_padding(TensorDict(fields, batch_size=[mask.shape[0]]))


def save_tiny_model(model_dir: str) -> None:
    """A 2-layer Qwen2 (hidden 32, vocabulary 64), seed 0, saved like a hub checkpoint; rank 0 writes it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if dist.get_rank() == 0 and not os.path.exists(os.path.join(model_dir, "config.json")):
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False)
        Qwen2ForCausalLM(config).save_pretrained(model_dir)
    dist.barrier()


def build_engine(model_dir: str, lr: float = 0.0):
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    # No flash-attn on CPU: the padded (eager attention) path instead of verl's remove-padding kernels.
    model = HFModelConfig(path=model_dir, load_tokenizer=False, use_remove_padding=False,
                          override_config={"attn_implementation": "eager"})
    fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}  # tight comparison; bf16 is verl's
    engine_config = FSDPEngineConfig(strategy=STRATEGY, mixed_precision=fp32, use_torch_compile=False,
                                     use_orig_params=True)
    engine = FSDPEngineWithLMHead(model_config=model, engine_config=engine_config,
                                  optimizer_config=FSDPOptimizerConfig(lr=lr), checkpoint_config=CheckpointConfig())
    engine.initialize()
    return engine


def actor_config(case: str):
    """verl's actor config for a case "loss_mode" or "loss_mode@loss_agg_mode" (default seq-mean-token-mean)."""
    from verl.workers.config import FSDPActorConfig, OptimizerConfig, PolicyLossConfig

    loss_mode, _, loss_agg_mode = case.partition("@")
    policy_loss = PolicyLossConfig(loss_mode=loss_mode)
    if loss_mode == "gmpo":
        from gmpo.verl import GMPOPolicyLossConfig

        policy_loss = GMPOPolicyLossConfig(loss_mode="gmpo")
    return FSDPActorConfig(
        strategy=STRATEGY, ppo_mini_batch_size=ROWS, ppo_micro_batch_size_per_gpu=1, use_dynamic_bsz=False,
        clip_ratio=EPS, clip_ratio_low=EPS, clip_ratio_high=EPS, clip_ratio_c=DUAL_CLIP, entropy_coeff=0.0,
        loss_agg_mode=loss_agg_mode or "seq-mean-token-mean", policy_loss=policy_loss, optim=OptimizerConfig(lr=0.0),
        rollout_n=1,
    )


def engine_grad(engine, data, config, split: str) -> tuple[dict, list[int]]:
    """Full gradient of one `forward_backward_batch`, and the rows of each micro-batch verl made."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    micro_batch_size, dynamic = SPLITS[split]
    data = data.clone()
    tu.assign_non_tensor(data, temperature=1.0, use_remove_padding=False, use_fused_kernels=False,
                         calculate_entropy=False, global_batch_size=ROWS, use_dynamic_bsz=dynamic,
                         micro_batch_size_per_gpu=micro_batch_size, max_token_len_per_gpu=MAX_TOKENS_PER_MICRO_BATCH)
    rows = []

    def loss_function(model_output, data, dp_group=None):
        rows.append(len(data))
        return ppo_loss(config=config, model_output=model_output, data=data, dp_group=dp_group)

    with engine.train_mode(zero_grad_on_exit=False):
        engine.optimizer_zero_grad()
        engine.forward_backward_batch(data, loss_function=loss_function)
        grads = full_grads(engine.module)
        engine.optimizer_zero_grad()
    return grads, rows


def full_grads(module) -> dict:
    """{name: unsharded gradient} of an FSDP2 module (its gradients are DTensor shards)."""
    return {name: p.grad.full_tensor() for name, p in module.named_parameters()}


def relative_error(grads: dict, reference: dict) -> float:
    num = sum((grads[n].double() - g).pow(2).sum() for n, g in reference.items())
    return math.sqrt(num / sum(g.pow(2).sum() for g in reference.values()))


def main(model_dir: str, out_path: str) -> None:
    use_cpu_platform()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    import verl  # noqa: F401  (loads the verl.plugins entry points: loss_mode=gmpo)
    from transformers import AutoModelForCausalLM

    save_tiny_model(model_dir)
    engine = build_engine(model_dir)
    reference_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64,
                                                           attn_implementation="eager")
    # gmpo@token-mean: verl's default loss_agg_mode, which the example keeps; GMPO's loss must not change
    cases = {"main": ["vanilla", "geo_mean", "gmpo", "gmpo@token-mean"], "dual_is": ["geo_mean", "gmpo"]}
    results = {}
    for batch_name, loss_modes in cases.items():
        batch = make_batch(seed=0, dual=batch_name == "dual_is")
        with torch.no_grad():  # pi_old = pi_theta * exp(offset): r_it = -offset_it
            old = torch.zeros(ROWS, RESPONSE)
            for i, log_prob in enumerate(row_log_probs(reference_model, batch)):
                old[i, : len(log_prob)] = (log_prob + batch["offset"][i, : len(log_prob)]).float()
        data = rank_data(batch, old, rank, world)
        for loss_mode in loss_modes:
            reference_fn = ppo_reference if loss_mode == "vanilla" else gmpo_reference
            reference = reference_grad(reference_model, batch, old, reference_fn)
            config = actor_config(loss_mode)
            for split in SPLITS:
                grads, rows = engine_grad(engine, data, config, split)
                all_rows = [None] * world
                dist.all_gather_object(all_rows, rows)
                results[f"{batch_name}/{loss_mode}/{split}"] = {
                    "relative_error": relative_error(grads, reference), "micro_batch_rows": all_rows}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"world_size": world, "strategy": STRATEGY, "cases": results}, f, indent=1)
        print_table(results, world)
    dist.destroy_process_group()


def print_table(results: dict, world: int) -> None:
    print(f"\nRelative gradient error vs the float64 whole batch: {world} ranks, {STRATEGY}, {ROWS} rows")
    heads = [f"{s} micro-batches / rank" if s != "dynamic" else "dynamic batching" for s in SPLITS]
    print("| batch / loss_mode | " + " | ".join(heads) + " |")
    print("|---" * (len(SPLITS) + 1) + "|")
    for key in dict.fromkeys(k.rsplit("/", 1)[0] for k in results):
        print(f"| {key} | " + " | ".join(f"{results[f'{key}/{s}']['relative_error']:.1e}" for s in SPLITS) + " |")
    first = next(iter(results)).rsplit("/", 1)[0]
    print(f"rows of each micro-batch, per rank, with dynamic batching: {results[first + '/dynamic']['micro_batch_rows']}")


if __name__ == "__main__":
    main(*sys.argv[1:])
