import inspect
import logging
import math
import textwrap

import torch
from trl import GRPOTrainer
from trl.trainer.utils import get_config_model_id

from gmpo.objective import gmpo_objective, k3_kl, row_advantages
from gmpo.trl.config import GMPOConfig
from gmpo.trl.guards import NonFiniteGradientGuard, name_reward_errors
from gmpo.trl.metrics import MetricPack
from gmpo.trl.resumable import ExactResumeMixin
from gmpo.trl.sampler_guard import StaleSamplerCheck
from gmpo.trl.vllm_sync import use_reload_sync_where_needed, vllm_platform_problem

logger = logging.getLogger(__name__)

# Parameters of GRPOTrainer._get_per_token_logps_and_entropies that are not model inputs taken from the batch; every
# other parameter is a (multimodal) input forwarded from `inputs` by name, so a key TRL adds is not dropped.
_NON_INPUT_LOGPS_ARGS = frozenset(
    {"model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy", "compute_aux_loss"}
)
# Metrics whose per-micro-batch values are combined by max / min at logging time instead of averaged.
_EXTREME_METRICS = {
    "gmpo/log_ratio_max": max,
    "gmpo/log_ratio_min": min,
    "gmpo/seq_weight_max": max,
    "gmpo/seq_weight_min": min,
}


class GMPOTrainer(StaleSamplerCheck, ExactResumeMixin, GRPOTrainer):
    """Trainer for Geometric-Mean Policy Optimization (GMPO, https://huggingface.co/papers/2507.20673).

    GMPO maximises mean_i A_i * w_i, where w_i is the geometric mean of row i's token importance ratios, each
    clipped one-sidedly in log space before the mean. Generation, rewards, advantages, vLLM, PEFT and distributed
    training are GRPOTrainer's; only the loss is replaced. The constructor is GRPOTrainer's; `args` must be a
    [`GMPOConfig`] and defaults to `GMPOConfig("<model>-GMPO")`. Checkpoints resume exactly ([`ExactResumeMixin`]).
    With vLLM in colocate mode on CPU the weights reach vLLM through its reload path (`gmpo.trl.vllm_sync`), and
    every rollout is checked against a stale sampler ([`StaleSamplerCheck`]).
    """

    _tag_names = ["trl", "gmpo"]
    _name = "GMPO"
    _paper = {
        "title": "Geometric-Mean Policy Optimization",
        "id": "2507.20673",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{zhao2025geometric,
                title        = {{Geometric-Mean Policy Optimization}},
                author       = {Yuzhong Zhao and Yue Liu and Junpeng Liu and Jingye Chen and Xun Wu and Yaru Hao and Tengchao Lv and Shaohan Huang and Lei Cui and Qixiang Ye and Fang Wan and Furu Wei},
                year         = 2025,
                eprint       = {arXiv:2507.20673},
            }"""),
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: GMPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = GMPOConfig(f"{model_name.split('/')[-1]}-GMPO")
        elif not isinstance(args, GMPOConfig):
            raise TypeError(
                f"GMPOTrainer needs `args` to be a gmpo.GMPOConfig, got {type(args).__name__}. GMPO's epsilon is in "
                "log space and its loss_type is 'gmpo', so a GRPOConfig would silently mean something else."
            )
        problem = vllm_platform_problem(args)  # before TRL waits for a server or starts an engine
        if problem is not None:
            raise ValueError(problem)
        if args.deepspeed:
            _share_process_group_with_deepspeed()
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
        self.reward_funcs = [
            name_reward_errors(func, name) if callable(func) and not isinstance(func, torch.nn.Module) else func
            for func, name in zip(self.reward_funcs, self.reward_func_names)
        ]
        if self.use_vllm:
            use_reload_sync_where_needed(self.vllm_generation)
        self._check_sampler = self._stale_sampler_check_applies()
        self._nonfinite_guard = NonFiniteGradientGuard(args.nonfinite_grad_policy, self.accelerator)
        self.add_callback(self._nonfinite_guard)
        params = inspect.signature(self._get_per_token_logps_and_entropies).parameters
        self._model_input_keys = [name for name in params if name not in _NON_INPUT_LOGPS_ARGS]
        if args.skip_zero_advantage_rows and self._rows_needed_beyond_policy:
            logger.info(
                "skip_zero_advantage_rows has no effect: zero-advantage rows are still needed for "
                + ", ".join(self._rows_needed_beyond_policy)
            )
        if not args.clip_can_act:
            logger.warning(
                "GMPO's clip cannot act in this run: gradient_accumulation_steps "
                f"({args.gradient_accumulation_steps}) is a multiple of steps_per_generation * num_iterations "
                f"({args.steps_per_generation} * {args.num_iterations}), so every batch is used before any optimizer "
                "step, old log-probs equal current ones and every ratio is 1. The update then equals GRPO's "
                "loss_type='grpo'. Set steps_per_generation > gradient_accumulation_steps or num_iterations > 1 "
                "to train off-policy as the paper does."
            )

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        metrics = MetricPack()
        num_rows = inputs["advantages"].size(0)
        inputs = self._drop_zero_advantage_rows(inputs, metrics)
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs.get(key) for key in self._model_input_keys},
        )
        advantages = row_advantages(inputs["advantages"], mask)
        old_per_token_logps = inputs.get("old_per_token_logps")
        if old_per_token_logps is None:
            old_per_token_logps = per_token_logps.detach()
        log_ratio = per_token_logps - old_per_token_logps

        policy_mask = mask
        if self.top_entropy_quantile < 1.0:
            policy_mask = mask * self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
        row_weight, token_weight = self._row_weights(inputs, per_token_logps, old_per_token_logps, advantages, mask)

        out = gmpo_objective(
            log_ratio,
            policy_mask,
            advantages,
            self.epsilon_low,
            self.epsilon_high,
            delta=self.args.delta,
            clip_level=self.args.importance_sampling_level,
            length_normalization=self.args.length_normalization,
            mean_power=self.args.mean_power,
            token_weight=token_weight,
            row_weight=row_weight,
            num_rows=num_rows,
        )
        loss = out.loss
        metrics.add_mean("policy_loss", out.loss.detach(), 1.0)

        if self.beta != 0.0:
            per_token_kl = self._per_token_kl(inputs["ref_per_token_logps"], per_token_logps, log_ratio, mask)
            loss = loss + self.beta * (per_token_kl.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
            metrics.add_mean("kl", per_token_kl.detach().sum(), mask.sum())

        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss / accumulation
        if self._entropy_bonus_enabled:
            loss = loss - self._entropy_bonus(entropies, policy_mask, mode, accumulation, metrics)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            metrics.add_mean("aux_loss", aux_loss.detach(), 1.0)

        metrics.add_mean("entropy", (entropies.detach() * mask).sum(), mask.sum())
        self._log_step_metrics(out.stats, metrics, mode)
        return loss

    @property
    def _rows_needed_beyond_policy(self) -> list[str]:
        """The loss terms, other than GMPO's, that read zero-advantage rows too."""
        return [
            reason
            for reason, applies in [
                ("beta != 0 (KL)", self.beta != 0.0),
                ("an entropy bonus", self._entropy_bonus_enabled),
                ("the MoE aux loss", self.aux_loss_enabled),
                ("top_entropy_quantile < 1", self.top_entropy_quantile < 1.0),
            ]
            if applies
        ]

    def _drop_zero_advantage_rows(self, inputs, metrics: MetricPack):
        """The micro-batch without the rows whose advantage is 0 (their term -0 * w_i has no gradient).

        At least one row is kept, so every process still runs a forward and backward and the gradient collectives
        of DDP / FSDP / DeepSpeed stay matched. The caller keeps dividing by the original number of rows.
        """
        advantages = inputs["advantages"]
        num_rows = advantages.size(0)
        if (
            not self.args.skip_zero_advantage_rows
            or self._rows_needed_beyond_policy
            or any(inputs.get(key) is not None for key in self._model_input_keys)
        ):
            return inputs
        nonzero = advantages != 0 if advantages.dim() == 1 else (advantages != 0).any(-1)
        keep = nonzero.nonzero().squeeze(1)
        metrics.add_mean("skipped_rows_frac", torch.tensor(float(num_rows - keep.numel())), num_rows)
        if keep.numel() == num_rows:
            return inputs
        if keep.numel() == 0:
            keep = keep.new_zeros(1)  # a zero-advantage row: a real forward and backward that adds exactly 0
        return {
            key: value[keep] if torch.is_tensor(value) and value.dim() > 0 and value.size(0) == num_rows else value
            for key, value in inputs.items()
        }

    def _row_weights(self, inputs, per_token_logps, old_per_token_logps, advantages, mask):
        """Multipliers from the off-policy mask and vLLM's importance-sampling correction.

        Returns the (B,) row weight (off-policy mask, sequence IS modes) and the (B, T) token weight (token IS modes,
        factors inside the mean; a token that token_mask zeroed is handled by `gmpo_objective`), each or None.
        """
        row_weight = token_weight = None
        if self.off_policy_mask_threshold is not None:
            keep = self.get_off_policy_mask(
                advantages=advantages.unsqueeze(1),
                per_token_logps=per_token_logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_per_token_logps),
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
            row_weight = keep.squeeze(1)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = inputs["importance_sampling_ratio"].detach()
            if self.vllm_importance_sampling_mode.startswith("sequence"):
                is_weight = is_ratio.reshape(-1)
                row_weight = is_weight if row_weight is None else row_weight * is_weight
            else:
                token_weight = is_ratio
        return row_weight, token_weight

    def _per_token_kl(self, ref_per_token_logps, per_token_logps, log_ratio, mask):
        """k3 KL per token (`gmpo.objective.k3_kl`), bias-corrected at the clip level when `use_bias_correction_kl`."""
        correction = log_ratio if self.args.use_bias_correction_kl else None
        return k3_kl(ref_per_token_logps, per_token_logps, mask, correction, self.args.importance_sampling_level)

    def _entropy_bonus(self, entropies, effective_mask, mode, accumulation, metrics):
        """coef * mean token entropy over the tokens the policy term acts on, as GRPOTrainer applies it; the
        coefficient is the one fixed at the end of the previous optimizer step."""
        entropy = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation
        if self.use_adaptive_entropy:
            apply_coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
            if mode == "train":
                stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
                window = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
                self._entropy_window_stats = window
                if self.accelerator.sync_gradients:
                    metrics.add_mean("_window_entropy", window[0], window[1])
        else:
            apply_coef = self.entropy_coef
        return apply_coef * entropy

    def _update_entropy_controller(self, world_entropy: float) -> None:
        if world_entropy <= self.args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min)
        self._last_world_entropy = world_entropy
        self._entropy_window_stats = None

    def _log_step_metrics(self, stats, metrics: MetricPack, mode: str) -> None:
        """Reduce every statistic of this micro-batch across processes in one collective, then record it."""
        metrics.add_mean("clip_ratio/low_mean", stats.low_clipped, stats.clip_units)
        metrics.add_mean("clip_ratio/high_mean", stats.high_clipped, stats.clip_units)
        metrics.add_mean("clip_ratio/region_mean", stats.low_clipped + stats.high_clipped, stats.clip_units)
        metrics.add_mean("gmpo/seq_weight_mean", stats.seq_weight_sum, stats.num_rows)
        metrics.add_max("gmpo/log_ratio_max", stats.log_ratio_max)
        metrics.add_min("gmpo/log_ratio_min", stats.log_ratio_min)
        metrics.add_max("gmpo/seq_weight_max", stats.seq_weight_max)
        metrics.add_min("gmpo/seq_weight_min", stats.seq_weight_min)
        values = metrics.reduce(self.accelerator.gather, self.accelerator.device)

        world_entropy = values.pop("_window_entropy", None)
        if world_entropy is not None:
            self._update_entropy_controller(0.0 if math.isnan(world_entropy) else world_entropy)
        for name, value in values.items():
            self._metrics[mode][name].append(value)
        if self._entropy_bonus_enabled and mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _clip_grad_norm(self, model):
        grad_norm = super()._clip_grad_norm(model)
        self._nonfinite_guard.grad_norm = grad_norm
        return grad_norm

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for name, combine in _EXTREME_METRICS.items():
            values = [v for v in self._metrics[mode].pop(name, []) if not math.isnan(v)]
            if values:
                logs[prefix + name] = combine(values)
        if mode == "train" and "loss" in logs:
            logs["nonfinite_steps_skipped"] = self._nonfinite_guard.skipped
        super().log(logs, start_time)


def _share_process_group_with_deepspeed() -> None:
    """Hand the process group accelerate created (torchrun with `deepspeed=`, e.g. gloo with use_cpu=True) to
    DeepSpeed's communication layer before the model is loaded: ZeRO-3 partitions parameters while loading, and with
    no DeepSpeed communicator it takes each process for the only one (batch-size assertion 16 != 8 * 1 * 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)

