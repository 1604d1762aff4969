"""skip_zero_advantage_rows: the same update with the zero-advantage rows left out of the forward and backward."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from gmpo import GMPOTrainer
from gmpo.trl.metrics import MetricPack

from .conftest import count_ones_reward, tiny_config
from .test_trainer_loss import make_inputs

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def parameter_gradient(trainer, inputs, skip):
    trainer.args.skip_zero_advantage_rows = skip
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, dict(inputs))
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


@pytest.mark.parametrize(
    "advantages, accumulation",
    [
        ([1.0, 0.0, 0.7, -1.2], 1),  # a zero row among non-zero ones
        ([0.0, -0.5, 0.0, 0.0], 1),  # mostly zero, one of them the empty row 2
        ([0.0, 0.0, 0.0, 0.0], 1),  # an all-zero micro-batch: one row is kept and adds exactly 0
        ([1.0, 0.0, 0.0, -1.2], 3),  # gradient accumulation
    ],
)
def test_gradient_is_unchanged(trainer, advantages, accumulation):
    trainer.current_gradient_accumulation_steps = accumulation
    inputs = make_inputs(trainer.model, spread=0.5)  # old log-probs differ: ratios != 1, as with num_iterations > 1
    inputs["advantages"] = torch.tensor(advantages, dtype=torch.float64)
    loss_skip, grad_skip = parameter_gradient(trainer, inputs, skip=True)
    loss_full, grad_full = parameter_gradient(trainer, inputs, skip=False)
    assert_close(loss_skip, loss_full)
    assert_close(grad_skip, grad_full)
    expected_frac = advantages.count(0.0) / len(advantages)
    assert trainer._metrics["train"]["skipped_rows_frac"][0] == pytest.approx(expected_frac)


def test_rows_are_actually_left_out(trainer, monkeypatch):
    seen_rows = []
    original = trainer._get_per_token_logps_and_entropies

    def spy(model, input_ids, *args, **kwargs):
        seen_rows.append(input_ids.size(0))
        return original(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", spy)
    inputs = make_inputs(trainer.model)
    inputs["advantages"] = torch.tensor([1.0, 0.0, 0.0, -1.2], dtype=torch.float64)
    trainer._compute_loss(trainer.model, inputs)
    assert seen_rows == [2]


@pytest.mark.parametrize(
    "overrides", [dict(beta=0.1), dict(entropy_coef=0.01), dict(top_entropy_quantile=0.5)],
    ids=["kl", "entropy-bonus", "top-entropy"],
)
def test_no_skipping_when_other_terms_need_the_rows(tiny_model_dir, prompt_dataset, tmp_path, overrides):
    t = GMPOTrainer(model=tiny_model_dir, reward_funcs=count_ones_reward, train_dataset=prompt_dataset,
                    args=tiny_config(tmp_path, **overrides))
    inputs = {"advantages": torch.tensor([0.0, 1.0]), "prompt_ids": torch.ones(2, 3, dtype=torch.long)}
    assert t._rows_needed_beyond_policy
    assert t._drop_zero_advantage_rows(inputs, metrics=MetricPack()) is inputs


def test_no_skipping_with_the_moe_aux_loss(tiny_moe_dir, prompt_dataset, tmp_path):
    t = GMPOTrainer(model=tiny_moe_dir, reward_funcs=count_ones_reward, train_dataset=prompt_dataset,
                    args=tiny_config(tmp_path))
    assert t.aux_loss_enabled and "the MoE aux loss" in t._rows_needed_beyond_policy
    inputs = {"advantages": torch.tensor([0.0, 1.0]), "prompt_ids": torch.ones(2, 3, dtype=torch.long)}
    assert t._drop_zero_advantage_rows(inputs, metrics=MetricPack()) is inputs


def test_same_weights_after_training_with_and_without_skipping(tiny_model_dir, prompt_dataset, tmp_path):
    initial = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    weights = []
    for skip in (True, False):
        # Plain SGD: w_T = w_0 - lr * sum_t g_t, so a rounding difference in g stays a rounding difference in w. AdamW
        # divides each g by its own running RMS and turns noise on a near-zero gradient into a step of size ~lr.
        t = GMPOTrainer(model=tiny_model_dir, reward_funcs=half_constant_reward, train_dataset=prompt_dataset,
                        args=tiny_config(tmp_path / str(skip), skip_zero_advantage_rows=skip, max_steps=3, optim="sgd"))
        t.train()
        weights.append({n: p.detach().clone() for n, p in t.model.named_parameters()})
        if skip:
            fractions = [log["skipped_rows_frac"] for log in t.state.log_history if "skipped_rows_frac" in log]
            assert fractions and max(fractions) > 0
    assert_same_sgd_weights(weights[0], weights[1], initial)


def assert_same_sgd_weights(got: dict, expected: dict, initial: dict) -> None:
    """Equal up to float32 rounding of the gradients that moved the weights away from `initial`.

    Leaving rows out changes the summation order inside the float32 matmuls. Each gradient entry is a sum of at most
    n = 128 terms on the tiny model (8 rows x <= 16 positions, or a hidden size <= 64), so it differs by at most about
    n * eps32 of its size; under SGD the weights then differ by at most n * eps32 times how far they moved.
    """
    moved = max((expected[name] - initial[name]).abs().max().item() for name in expected)
    assert moved > 1e-4, f"the weights barely moved ({moved:.1e}): equal weights would prove nothing"
    bound = 128 * torch.finfo(torch.float32).eps * moved
    for name in expected:
        assert_close(got[name], expected[name], rtol=0, atol=bound, msg=name)


def half_constant_reward(prompts, completions, **kwargs):
    """Constant (zero-variance groups) for prompts starting with an even digit, else a reward with spread."""
    return [1.0 if int(p[0]) % 2 == 0 else float(c.count("1")) for p, c in zip(prompts, completions)]


def test_two_processes_one_with_an_all_zero_micro_batch(tiny_model_dir, tmp_path):
    finals = {}
    for skip in ("1", "0"):
        out = tmp_path / f"skip{skip}"
        # torchrun, not `accelerate launch --cpu --num_processes 2`: accelerate 1.15 starts a single process for
        # that (its multi-CPU launcher needs mpirun). With use_cpu=True, accelerate then runs MULTI_CPU over gloo.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(SCRIPTS, "ddp_skip_rows.py"), tiny_model_dir, str(out), skip]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        finals[skip] = load_file(out / "final" / "model.safetensors")
    assert_same_sgd_weights(finals["1"], finals["0"], load_file(os.path.join(tiny_model_dir, "model.safetensors")))
