import math
import os
from dataclasses import dataclass, field

from trl import GRPOConfig

from gmpo.objective import CLIP_LEVELS
from gmpo.trl.guards import NONFINITE_GRAD_POLICIES
from gmpo.trl.sampler_guard import STALE_SAMPLER_POLICIES


@dataclass
class GMPOConfig(GRPOConfig):
    r"""
    Configuration class for the [`GMPOTrainer`].

    Inherits every parameter of [`~trl.GRPOConfig`] and changes only those that shape the loss. GMPO clips each
    token's *log* importance ratio before the geometric mean is taken, so `epsilon` and `epsilon_high` are in log
    space: the ratio is kept in `(exp(-epsilon), exp(epsilon_high))`. The paper uses `(exp(-0.4), exp(0.4))`.

    Parameters:
        epsilon (`float`, *optional*, defaults to `0.4`):
            Lower clip bound in log space: each token's importance ratio is kept above exp(-epsilon) for negative
            advantages. Must be >= 0; `inf` disables the clip (the paper's "without clip" ablation).
        epsilon_high (`float`, *optional*):
            Upper clip bound in log space: each token's importance ratio is kept below exp(epsilon_high) for positive
            advantages. Must be >= 0; `inf` disables it. Defaults to `epsilon`.
        delta (`float`, *optional*):
            Dual clip, in ratio space (> 1): after the sign-aware clip every clipped log-ratio (a token's, or with a
            sequence level the row's mean or sum) is capped at log(delta), which bounds the weight of
            negative-advantage rows too. `None` disables it.
        loss_type (`str`, *optional*, defaults to `"gmpo"`):
            Must be 'gmpo': the loss is -mean_i A_i * w_i over the rows, with the 1/|o_i| normalisation inside the
            geometric mean w_i. GRPO's token aggregations ('grpo', 'dapo', 'bnpo', 'dr_grpo', ...) do not apply.
        importance_sampling_level (`str`, *optional*, defaults to `"token"`):
            Where the clip acts. 'token' clips each token's log-ratio before the mean (the paper's method). 'sequence'
            clips the row's mean log-ratio (1/|o_i|) sum_t r_it, the length-normalised sequence ratio of GSPO and of
            TRL's importance_sampling_level='sequence'. 'sequence_product' clips the row's summed log-ratio sum_t r_it,
            the log of the whole-sequence ratio, and then divides it by |o_i|: the paper's sequence-level clip (Table 4;
            the authors' gmpo_seqclip).
        length_normalization (`bool`, *optional*, defaults to `True`):
            Keep the 1/|o_i| exponent of the geometric mean. False is the paper's ablation that sums the clipped
            log-ratios instead (w_i becomes the plain product of the ratios and can overflow on long rows).
        mean_power (`float`, *optional*, defaults to `0.0`):
            Exponent p of the power mean of the clipped token ratios: w_i = ((1/|o_i|) sum_t c_it^p)^(1/p). 0 is the
            geometric mean (GMPO), 1 the arithmetic mean (GRPO's loss_type='grpo' when the log-space bounds are set to
            GRPO's linear ones), -1 the harmonic mean (the authors' hmpo). Any finite value; p != 0 needs
            importance_sampling_level='token' and length_normalization=True.
        skip_zero_advantage_rows (`bool`, *optional*, defaults to `True`):
            Leave rows whose advantage is exactly 0 out of the policy forward and backward; the loss still divides
            by the full number of rows, so the gradient is unchanged. Applies only when nothing else needs those rows
            (beta == 0, no entropy bonus, no MoE aux loss, top_entropy_quantile == 1, no multimodal inputs);
            statistics are then over the rows actually forwarded.
        nonfinite_grad_policy (`str`, *optional*, defaults to `"skip"`):
            What to do when a gradient holds NaN or inf before an optimizer step: 'skip' leaves the weights and the
            optimizer state untouched for that step, logs a warning and counts it in `nonfinite_steps_skipped`;
            'stop' raises an error naming the step.
        stale_sampler_policy (`str`, *optional*, defaults to `"stop"`):
            With use_vllm (colocate mode), what to do when vLLM's log-probs show that it samples from other weights
            than the trainer's (a failed or skipped weight sync): after each rollout a few of its sequences are scored
            by vLLM and by the policy at temperature 1, independently of the sampling settings. 'stop' raises an
            error naming the step (`gmpo train`: exit status 3), 'warn' logs a warning and trains on, 'off' skips the
            check.
        stale_sampler_threshold (`float`, *optional*, defaults to `0.1`):
            Mean absolute per-token log-prob difference between vLLM and the policy (logged as
            `sampling/weights_logp_difference`) above which the sampler counts as stale. A synced bfloat16 vLLM
            against a float32 trainer stays near 0.01 on the built-in task; must be > 0.
    """

    epsilon: float = field(
        default=0.4,
        metadata={
            "help": "Lower clip bound in log space: each token's importance ratio is kept above exp(-epsilon) for "
            "negative advantages. Must be >= 0; `inf` disables the clip (the paper's \"without clip\" ablation)."
        },
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={
            "help": "Upper clip bound in log space: each token's importance ratio is kept below exp(epsilon_high) "
            "for positive advantages. Must be >= 0; `inf` disables it. Defaults to `epsilon`."
        },
    )
    delta: float | None = field(
        default=None,
        metadata={
            "help": "Dual clip, in ratio space (> 1): after the sign-aware clip every clipped log-ratio (a token's, "
            "or with a sequence level the row's mean or sum) is capped at log(delta), which bounds the weight of "
            "negative-advantage rows too. `None` disables it."
        },
    )
    loss_type: str = field(
        default="gmpo",
        metadata={
            "help": "Must be 'gmpo': the loss is -mean_i A_i * w_i over the rows, with the 1/|o_i| normalisation "
            "inside the geometric mean w_i. GRPO's token aggregations ('grpo', 'dapo', 'bnpo', 'dr_grpo', ...) do "
            "not apply."
        },
    )
    importance_sampling_level: str = field(
        default="token",
        metadata={
            "help": "Where the clip acts. 'token' clips each token's log-ratio before the mean (the paper's method). "
            "'sequence' clips the row's mean log-ratio (1/|o_i|) sum_t r_it, the length-normalised sequence ratio of "
            "GSPO and of TRL's importance_sampling_level='sequence'. 'sequence_product' clips the row's summed "
            "log-ratio sum_t r_it, the log of the whole-sequence ratio, and then divides it by |o_i|: the paper's "
            "sequence-level clip (Table 4; the authors' gmpo_seqclip)."
        },
    )
    length_normalization: bool = field(
        default=True,
        metadata={
            "help": "Keep the 1/|o_i| exponent of the geometric mean. False is the paper's ablation that sums the "
            "clipped log-ratios instead (w_i becomes the plain product of the ratios and can overflow on long rows)."
        },
    )

    mean_power: float = field(
        default=0.0,
        metadata={
            "help": "Exponent p of the power mean of the clipped token ratios: w_i = ((1/|o_i|) sum_t c_it^p)^(1/p). "
            "0 is the geometric mean (GMPO), 1 the arithmetic mean (GRPO's loss_type='grpo' when the log-space bounds "
            "are set to GRPO's linear ones), -1 the harmonic mean (the authors' hmpo). Any finite value; p != 0 needs "
            "importance_sampling_level='token' and length_normalization=True."
        },
    )

    skip_zero_advantage_rows: bool = field(
        default=True,
        metadata={
            "help": "Leave rows whose advantage is exactly 0 out of the policy forward and backward; the loss still "
            "divides by the full number of rows, so the gradient is unchanged. Applies only when nothing else needs "
            "those rows (beta == 0, no entropy bonus, no MoE aux loss, top_entropy_quantile == 1, no multimodal "
            "inputs); statistics are then over the rows actually forwarded."
        },
    )

    nonfinite_grad_policy: str = field(
        default="skip",
        metadata={
            "help": "What to do when a gradient holds NaN or inf before an optimizer step: 'skip' leaves the "
            "weights and the optimizer state untouched for that step, logs a warning and counts it in "
            "`nonfinite_steps_skipped`; 'stop' raises an error naming the step."
        },
    )

    stale_sampler_policy: str = field(
        default="stop",
        metadata={
            "help": "With use_vllm (colocate mode), what to do when vLLM's log-probs show that it samples from other "
            "weights than the trainer's (a failed or skipped weight sync): after each rollout a few of its sequences "
            "are scored by vLLM and by the policy at temperature 1, independently of the sampling settings. 'stop' "
            "raises an error naming the step (`gmpo train`: exit status 3), 'warn' logs a warning and trains on, "
            "'off' skips the check."
        },
    )
    stale_sampler_threshold: float = field(
        default=0.1,
        metadata={
            "help": "Mean absolute per-token log-prob difference between vLLM and the policy (logged as "
            "`sampling/weights_logp_difference`) above which the sampler counts as stale. A synced bfloat16 vLLM "
            "against a float32 trainer stays near 0.01 on the built-in task; must be > 0."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        for name in ("epsilon", "epsilon_high"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or math.isnan(value) or value < 0:
                raise ValueError(
                    f"`{name}` is a GMPO clip bound in log space and must be a number >= 0 (or inf to disable the "
                    f"clip), got {value!r}. The paper uses 0.4, i.e. ratios in (exp(-0.4), exp(0.4))."
                )
        if self.delta is not None and (math.isnan(self.delta) or self.delta <= 1):
            raise ValueError(
                f"`delta` is the dual-clip cap on the token ratio (ratio space, log-ratio capped at log(delta)) and "
                f"must be > 1, got {self.delta!r}. Use a value above exp(epsilon_high), or None to disable it."
            )
        if self.loss_type != "gmpo":
            raise ValueError(
                f"`loss_type` must be 'gmpo' for GMPOTrainer, got {self.loss_type!r}. GMPO aggregates with a plain "
                "mean over rows of A_i * w_i; for GRPO's token aggregations use trl.GRPOTrainer."
            )
        if self.importance_sampling_level not in CLIP_LEVELS:
            raise ValueError(
                f"`importance_sampling_level` selects where GMPO's clip acts and must be one of {list(CLIP_LEVELS)}, "
                f"got {self.importance_sampling_level!r}."
            )
        if isinstance(self.mean_power, bool) or not isinstance(self.mean_power, int | float) or not math.isfinite(
            self.mean_power
        ):
            raise ValueError(
                f"`mean_power` is the exponent p of the power mean of the clipped token ratios and must be a finite "
                f"number (0 = geometric mean, 1 = arithmetic, -1 = harmonic), got {self.mean_power!r}."
            )
        self.mean_power = float(self.mean_power)
        if self.mean_power != 0 and self.importance_sampling_level != "token":
            raise ValueError(
                f"`mean_power`={self.mean_power!r} needs `importance_sampling_level`='token', got "
                f"{self.importance_sampling_level!r}: a sequence-level clip acts on one number per row, so there is no "
                "mean over tokens to take. Use mean_power=0.0 with a sequence level."
            )
        if self.nonfinite_grad_policy not in NONFINITE_GRAD_POLICIES:
            raise ValueError(
                f"`nonfinite_grad_policy` must be one of {list(NONFINITE_GRAD_POLICIES)}, "
                f"got {self.nonfinite_grad_policy!r}."
            )
        if self.stale_sampler_policy not in STALE_SAMPLER_POLICIES:
            raise ValueError(
                f"`stale_sampler_policy` must be one of {list(STALE_SAMPLER_POLICIES)}, got {self.stale_sampler_policy!r}."
            )
        threshold = self.stale_sampler_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold < math.inf:
            raise ValueError(
                "`stale_sampler_threshold` is a mean absolute log-prob difference per token and must be a finite "
                f"number > 0, got {threshold!r}."
            )
        for name in ("length_normalization", "skip_zero_advantage_rows"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.mean_power != 0 and not self.length_normalization:
            raise ValueError(
                f"`mean_power`={self.mean_power!r} needs `length_normalization`=True, got False: the power mean is "
                "defined with its 1/|o_i|. Use mean_power=0.0 for the ablation without the exponent."
            )

        check_launch(self)

    @property
    def clip_can_act(self) -> bool:
        """Whether old log-probs can differ from current ones, i.e. an optimizer step can fall between a batch's
        generation and its use (TRL computes old log-probs only then)."""
        return self.gradient_accumulation_steps % (self.steps_per_generation * self.num_iterations) != 0


# accelerate 1.15 shards with FSDP only on these device types; on CPU it drops the FSDP plugin without a word.
_FSDP_DEVICE_TYPES = ("MULTI_GPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_NPU", "MULTI_XPU", "MULTI_HPU",
                      "MULTI_NEURON", "FSDP")


def check_launch(args) -> None:
    """ValueError when the processes would not train as configured: a launch of several processes that accelerate
    runs each alone, or an FSDP setting that accelerate would ignore (on CPU)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    args.world_size  # noqa: B018 (sets up the distributed state)
    kind = args.distributed_state.distributed_type.name if args.distributed_state is not None else "NO"
    fsdp = args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and kind not in _FSDP_DEVICE_TYPES:
        setting = f"fsdp={args.fsdp!r}" if args.fsdp else "the accelerate config's FSDP (ACCELERATE_USE_FSDP=true)"
        raise ValueError(
            f"{setting} cannot shard here: accelerate runs FSDP only on GPUs (and other accelerators), and on this "
            f"machine (distributed type {kind}, use_cpu={args.use_cpu}) it would drop the setting and train unsharded. "
            "On CPU, DeepSpeed ZeRO-3 shards parameters (accelerate launch with a DeepSpeed config, or "
            "deepspeed=CONFIG under torchrun); otherwise remove the FSDP setting or run on GPUs."
        )
    if launched > 1 and (kind == "NO" or args.world_size == 1):
        hint = ("use_cpu=True (or ddp_backend='gloo' with DeepSpeed)" if args.deepspeed or
                os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" else "use_cpu=True")
        raise ValueError(
            f"This process is one of WORLD_SIZE={launched}, but accelerate runs it alone (distributed type NO, "
            f"use_cpu={args.use_cpu}, ddp_backend={args.ddp_backend!r}): each process would train its own model. "
            f"Without a GPU set {hint}; with GPUs, check that this process sees one."
        )
