"""The CPU suite's guarantees on CUDA, in bf16 and fp32: the objective, `_compute_loss` through TRL's fused LM head
on a Qwen3-shaped model, bf16 training off-policy, and `skip_zero_advantage_rows`.

Marked `gpu`; the whole module is skipped without CUDA. GMPO_TEST_DEVICE picks the device instead: `cpu` runs the
same tests on CPU (a check of the test bodies where no GPU is available), `cuda` insists on CUDA.

    python -m pytest -q tests/test_gpu.py                        # on a CUDA machine
    GMPO_TEST_DEVICE=cpu python -m pytest -q tests/test_gpu.py   # the same tests on CPU

Tolerances are worst-case rounding bounds, derived from the unit roundoff u of each dtype (u = eps / 2: 2^-8 for
bf16, 2^-24 for fp32) and stated next to each test; none is a measured fudge factor.
"""

import math
import os

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from gmpo import GMPOTrainer
from gmpo.objective import gmpo_objective

from .conftest import build_tokenizer, save_model_dir, tiny_config
from .reference import reference_loss
from .test_skip_rows import parameter_gradient
from .test_trainer_loss import expected_policy_loss, make_inputs, reference_logps_and_entropy

DEVICE = os.environ.get("GMPO_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
if DEVICE is None:
    pytest.skip("needs CUDA (or GMPO_TEST_DEVICE=cpu to run these tests on CPU)", allow_module_level=True)
pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float32]
U32 = torch.finfo(torch.float32).eps / 2
VOCAB = 40_000  # > TRL's 32,768-wide vocabulary chunk: the fused head folds two chunks, as on a real vocabulary
LENGTHS = [200, 37, 0, 129]  # row 2 has no valid token


def unit_roundoff(dtype) -> float:
    return torch.finfo(dtype).eps / 2


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """A randomly initialised Qwen3 (q/k norms, GQA, tied embeddings), small, saved in float32."""
    tokenizer = build_tokenizer()
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    return save_model_dir(tmp_path_factory, "tiny-qwen3", Qwen3ForCausalLM, config)


def make_trainer(model_dir, dataset, output_dir, dtype, **overrides):
    args = tiny_config(output_dir, use_cpu=DEVICE == "cpu", bf16=dtype == torch.bfloat16,
                       model_init_kwargs={"dtype": dtype}, **overrides)
    trainer = GMPOTrainer(model=model_dir, reward_funcs=even_id_reward, args=args, train_dataset=dataset)
    assert trainer.model.device.type == torch.device(DEVICE).type and trainer.model.dtype == dtype
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def even_id_reward(completion_ids, **kwargs):
    """Spread inside every group from the token ids (most of the 40k ids have no text in the character tokenizer)."""
    return [float(sum(token % 2 == 0 for token in ids)) for ids in completion_ids]


def row_scale(log_ratio, mask, advantages):
    """(B,) bound on the size of row i's loss term |A_i w_i| / B: w_i and 1/w_i are <= exp(mean_t |r_it|)."""
    mean_abs = (log_ratio.abs() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return advantages.abs() * mean_abs.exp() / log_ratio.size(0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_objective_matches_float64_reference(dtype):
    g = torch.Generator().manual_seed(0)
    rows, length = 16, 512
    log_ratio = torch.randn(rows, length, generator=g, dtype=torch.float64) * 0.3
    mask = (torch.arange(length) < torch.randint(1, length + 1, (rows, 1), generator=g)).double()
    mask[3] = 0  # an empty row
    # |A| in [0.5, 1.5]: the reference multiplies |o_i| factors |rho A| (512^th powers of |A| stay in float64's range)
    advantages = (torch.rand(rows, generator=g, dtype=torch.float64) + 0.5) * torch.randn(rows, generator=g).sign()
    advantages[5] = 0.0
    x = log_ratio.to(DEVICE, dtype).requires_grad_()
    out = gmpo_objective(x, mask.to(DEVICE), advantages.to(DEVICE, dtype), 0.4, 0.4)
    out.loss.backward()

    # Row i's term A_i w_i with w_i = exp(mean_t c_it). Rounding the inputs to `dtype` moves r and A by u_in
    # relative: the term by <= u_in (1 + max_t |r_it|) relative (the clip is 1-Lipschitz). The float32 arithmetic
    # adds to the exponent the error of a sum of |o_i| terms, gamma_|o_i| sum_t |c_it| / |o_i| ~ u32 sum_t |r_it|,
    # then a few roundings (mean, exp, product) and the sum over B rows (B u32). Factor 2 for second-order terms.
    abs_r = log_ratio.abs() * mask
    arithmetic = U32 * (abs_r.sum(-1) + rows + 4)
    scale = row_scale(log_ratio, mask, advantages)
    loss_bound = 2 * (scale * (unit_roundoff(dtype) * (1 + abs_r.amax(-1)) + arithmetic)).sum().item()
    expected = reference_loss(log_ratio, mask, advantages, 0.4, 0.4)
    error = abs(out.loss.item() - expected.item())
    assert error <= loss_bound, f"loss {out.loss.item():.8g} vs {expected.item():.8g}: off by {error:.3g} > {loss_bound:.3g}"

    # Gradient against the reference on the same rounded inputs, so only the arithmetic error remains, plus the
    # rounding of the gradient itself to `dtype`: token t of row i gets -A_i w_i / (B |o_i|) (0 where clipped), so
    # the bound is that size times the row's relative error.
    rounded = x.detach().double().cpu().requires_grad_()
    reference_loss(rounded, mask, advantages.to(dtype).double(), 0.4, 0.4).backward()
    grad_bound = 2 * (scale * (arithmetic + unit_roundoff(dtype)) / mask.sum(-1).clamp(min=1))[:, None]
    error = (x.grad.double().cpu() - rounded.grad).abs()
    assert (error <= grad_bound).all(), f"gradient off by {error.max():.3g}, bound {grad_bound.max():.3g}"


def logit_bounds(model, inputs):
    """max |z| over the completion logits and M = max_t ||h_t|| max_j ||W_j|| >= sum_k |h_tk W_jk| (Cauchy-Schwarz)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state.double()
        logits = model(input_ids=ids, attention_mask=attention).logits
    weight = model.get_output_embeddings().weight.double()
    max_logit = logits[:, inputs["prompt_ids"].size(1) - 1:-1].abs().max().item()
    return max_logit, hidden.norm(dim=-1).max().item() * weight.norm(dim=-1).max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_compute_loss_on_qwen3_matches_float64_reference(qwen3_dir, prompt_dataset, tmp_path, dtype):
    trainer = make_trainer(qwen3_dir, prompt_dataset, tmp_path, dtype)
    model = trainer.model
    with trainer.accelerator.autocast():  # the reference forward runs under the trainer's precision too
        inputs = make_inputs(model, lengths=LENGTHS)
        logps, _ = reference_logps_and_entropy(model, inputs)
        expected = expected_policy_loss(model, inputs)
        max_logit, m = logit_bounds(model, inputs)
    loss = trainer._compute_loss(model, inputs)

    # Both sides run the same backbone; the LM heads differ (TRL's fused head scores tiles of the vocabulary).
    # Each side computes a logit as a float32 dot product of length H (error <= H u32 M) and rounds it to `dtype`
    # (<= u |z|): |dz| <= 2 (u max|z| + H u32 M). A log-prob z_o - logsumexp(z) moves by at most 2 |dz|, plus the
    # fused head's float32 log-sum-exp, a blocked sum of V exponentials (<= (V / 1024 + 10) u32, tiles of 1024).
    # The loss -(1/B) sum_i A_i w_i, w_i = exp(mean_t c_it), then moves by sum_i |A_i w_i| / B times that.
    # Factor 2 for second-order terms.
    hidden_size, vocab = model.config.hidden_size, model.config.vocab_size
    dz = 2 * (unit_roundoff(dtype) * max_logit + hidden_size * U32 * m)
    per_token = 2 * dz + (vocab / 1024 + 10) * U32
    log_ratio, mask = (logps - inputs["old_per_token_logps"]).cpu(), inputs["completion_mask"].double().cpu()
    bound = 2 * row_scale(log_ratio, mask, inputs["advantages"].cpu()).sum().item() * per_token
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    error = abs(loss.item() - expected.item())
    assert error <= bound, f"loss {loss.item():.8g} vs float64 {expected.item():.8g}: off by {error:.3g} > {bound:.3g}"


def test_bf16_training_off_policy_with_gradient_accumulation(qwen3_dir, prompt_dataset, tmp_path):
    trainer = make_trainer(
        qwen3_dir, prompt_dataset, tmp_path, torch.bfloat16,
        per_device_train_batch_size=4,  # one prompt x 4 generations per micro-batch
        gradient_accumulation_steps=2,
        steps_per_generation=4,  # > gradient_accumulation_steps: 2 optimizer steps per rollout, the 2nd off-policy
        max_completion_length=16,  # short rows keep generation cheap
        max_steps=4,  # two rollouts
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    for name, p in trainer.model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} has non-finite values"
    unchanged = [name for name, p in trainer.model.named_parameters() if torch.equal(p, before[name])]
    assert not unchanged, f"parameters did not change: {unchanged}"

    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == 4
    for log in steps:
        assert log["nonfinite_steps_skipped"] == 0, log
        for name in ["loss", "grad_norm", "gmpo/log_ratio_max", "gmpo/log_ratio_min", "clip_ratio/region_mean",
                     "gmpo/seq_weight_mean"]:
            assert math.isfinite(log[name]), (name, log)
    # Off-policy: after the first optimizer step of a rollout the ratios leave 1.
    assert max(log["gmpo/log_ratio_max"] for log in steps) > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_skipping_zero_advantage_rows_keeps_the_gradient(qwen3_dir, prompt_dataset, tmp_path, dtype):
    trainer = make_trainer(qwen3_dir, prompt_dataset, tmp_path, dtype)
    with trainer.accelerator.autocast():
        inputs = make_inputs(trainer.model, spread=0.5, lengths=LENGTHS)  # ratios != 1, as off-policy
    inputs["advantages"] = torch.tensor([1.0, 0.0, 0.7, -1.2], dtype=torch.float64, device=DEVICE)
    loss_skip, grad_skip = parameter_gradient(trainer, inputs, skip=True)
    loss_full, grad_full = parameter_gradient(trainer, inputs, skip=False)
    assert trainer._metrics["train"]["skipped_rows_frac"][0] == 0.25  # row 1 was left out

    # Same math (row 1's term is -0 * w_1, no gradient); fewer rows only change the GEMM shapes, hence summation
    # order and rounding. A rounded op moves a value by <= u relative; through the forward and backward of L layers
    # and the head (<= 4 rounded ops per layer each way) the gradient moves by <= 8 (L + 1) u relative, as a norm.
    bound = 8 * (trainer.model.config.num_hidden_layers + 1) * unit_roundoff(dtype)
    relative = ((grad_skip - grad_full).double().norm() / grad_full.double().norm()).item()
    assert relative <= bound, f"gradients differ by {relative:.3g} (relative norm) > {bound:.3g}"
    assert abs(loss_skip.item() - loss_full.item()) <= bound * abs(loss_full.item())
