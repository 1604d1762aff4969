"""Train-step time and peak GPU memory, one GPU, bf16: gmpo.GMPOTrainer vs trl.GRPOTrainer(loss_type="grpo") vs
trl.experimental.gmpo.GMPOTrainer, and what skip_zero_advantage_rows saves when half of the groups tie.

Model: a random Qwen3ForCausalLM with Qwen3-0.6B's published shapes (QWEN3_0_6B below), built from a config (no
download), saved once in bf16. Prompts are --prompt-length digits (a token each); every completion is forced to
--completion-length tokens (min_new_tokens), so all trainers do the same work. Off-policy as in the recipes:
steps_per_generation 8 > gradient_accumulation_steps 2, so each rollout feeds 4 optimizer steps.

Each variant trains in its own subprocess (its peak memory is its own), in rotated order every round:
    grpo, gmpo, trl-gmpo          reward distinct inside every group: no advantage is 0, nothing is skipped
    gmpo-skip-on, gmpo-skip-off   reward tied inside every other group: 50% of the rows have A = 0

An optimizer step (on_step_begin -> on_step_end, CUDA-synchronised at every boundary) splits into
    generation   _generate_and_score_completions (sampling, rewards, old log-probs), on steps that start a rollout
    optimizer    gradient clipping, pre-optimizer callbacks (gmpo's non-finite guard), optimizer.step()
    fwd+bwd      the rest: forward, loss and backward of the gradient_accumulation_steps micro-batches
The first rollout is warm-up. Peak memory is torch.cuda.max_memory_allocated, reset at every step and after each
generation: the maximum over the run of generation and of the rest of the step (fwd+bwd and optimizer, where the
trainers differ). On CPU the process's peak RSS stands in for it.

    python benchmarks/gpu_step.py                              # one GPU, all five variants, one round
    python benchmarks/gpu_step.py --rounds 3 --output out.json
    python benchmarks/gpu_step.py --device cpu --tiny          # the same logic on a tiny model on CPU (a logic check)
"""

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from datasets import Dataset
from transformers import Qwen3Config, Qwen3ForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from gmpo import GMPOConfig, GMPOTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_time import RESULT_MARKER, build_tokenizer, source_state  # noqa: E402

with warnings.catch_warnings():  # every worker imports all three trainers
    warnings.simplefilter("ignore")
    from trl.experimental.gmpo import GMPOConfig as TRLGMPOConfig
    from trl.experimental.gmpo import GMPOTrainer as TRLGMPOTrainer

QWEN3_0_6B = dict(  # Qwen/Qwen3-0.6B config.json
    hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
    max_position_embeddings=40960,
)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=4096, tie_word_embeddings=True)
VARIANTS = {  # name -> (trainer, reward, skip_zero_advantage_rows)
    "grpo": ("grpo", "distinct", None),
    "gmpo": ("gmpo", "distinct", True),
    "trl-gmpo": ("trl-gmpo", "distinct", None),
    "gmpo-skip-on": ("gmpo", "half-tied", True),
    "gmpo-skip-off": ("gmpo", "half-tied", False),
}
ROWS = {  # summary key -> table label
    "step": "median step [s]", "mean_step": "mean step [s]", "generation": "median generation [s]",
    "fwd_bwd": "median fwd+bwd [s]", "optimizer": "median optimizer [s]",
    "peak_train": "peak memory, fwd+bwd+opt [MiB]", "peak_generation": "peak memory, generation [MiB]",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="2-layer hidden-64 Qwen3, short rows: a logic check on CPU")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weights and autocast")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=1, help="repetitions of all variants, order rotated")
    p.add_argument("--rollouts", type=int, default=2, help="rollouts per run, the first one warm-up")
    p.add_argument("--prompt-length", type=int, help="tokens per prompt (default 128; 16 with --tiny)")
    p.add_argument("--completion-length", type=int, help="tokens per completion (default 1024; 32 with --tiny)")
    p.add_argument("--batch-size", type=int, default=8, help="per_device_train_batch_size: rows per micro-batch")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--gradient-accumulation-steps", type=int, default=2)
    p.add_argument("--steps-per-generation", type=int, default=8)
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                   help="default: on (as the Qwen3-0.6B recipe), off with --tiny")
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--threads", type=int, help="torch threads per worker (default: 1 on CPU, torch's on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="optional JSON file with every number")
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)  # internal: run one variant
    p.add_argument("--model-dir", help=argparse.SUPPRESS)  # internal: the checkpoint the parent built
    args = p.parse_args(argv)
    args.prompt_length = args.prompt_length or (16 if args.tiny else 128)
    args.completion_length = args.completion_length or (32 if args.tiny else 1024)
    if args.activation_checkpointing is None:
        args.activation_checkpointing = not args.tiny
    rollout_rows = args.batch_size * args.steps_per_generation
    if args.steps_per_generation % args.gradient_accumulation_steps or rollout_rows % (2 * args.num_generations):
        p.error("steps_per_generation must be a multiple of gradient_accumulation_steps, and a rollout "
                "(batch_size x steps_per_generation rows) an even number of groups of num_generations")
    return args


def build_checkpoint(path, args):
    """Random Qwen3 (0.6B shapes, or TINY) and the character tokenizer, saved like a hub checkpoint."""
    tokenizer = build_tokenizer()
    config = Qwen3Config(**(TINY if args.tiny else QWEN3_0_6B), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(args.seed)
    model = Qwen3ForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def distinct_reward(completion_ids, **kwargs):
    """A checksum of the token ids: distinct inside a group, so no advantage is exactly 0."""
    return [sum(i * t for i, t in enumerate(ids, 1)) % 1_000_003 / 1_000_003 for ids in completion_ids]


def half_tied_reward_for(num_generations):
    def half_tied_reward(completion_ids, **kwargs):
        """0 for every row of the even-numbered groups (all their advantages are 0), the checksum elsewhere."""
        return [0.0 if (i // num_generations) % 2 == 0 else r for i, r in enumerate(distinct_reward(completion_ids))]

    return half_tied_reward


class PhaseTimer(TrainerCallback):
    """Per optimizer step: seconds of the step, of generation and of the optimizer phase; peak GPU memory of the
    generation and of the rest of the step."""

    def __init__(self, device):
        self.cuda = device == "cuda"
        self.records = []

    def now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def peak_mib(self, reset=False):
        if not self.cuda:
            return float("nan")
        peak = torch.cuda.max_memory_allocated() / 2**20
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return peak

    def wrap(self, trainer):
        generate, clip = trainer._generate_and_score_completions, trainer._clip_grad_norm

        def timed_generate(*a, **kw):
            start = self.now()
            out = generate(*a, **kw)
            self.generation += self.now() - start
            self.peak_generation = self.peak_mib(reset=True)
            return out

        def timed_clip(*a, **kw):
            self.optimizer_start = self.now()
            return clip(*a, **kw)

        trainer._generate_and_score_completions, trainer._clip_grad_norm = timed_generate, timed_clip

    def on_step_begin(self, *_, **__):
        self.peak_mib(reset=True)
        self.generation, self.optimizer, self.optimizer_start, self.peak_generation = 0.0, 0.0, None, float("nan")
        self.start = self.now()

    def on_pre_optimizer_step(self, *_, **__):
        self.optimizer_start = self.optimizer_start or self.now()  # when clipping is off

    def on_optimizer_step(self, *_, **__):
        self.optimizer = self.now() - self.optimizer_start

    def on_step_end(self, *_, **__):
        step = self.now() - self.start
        self.records.append(dict(step=step, generation=self.generation, optimizer=self.optimizer,
                                 fwd_bwd=step - self.generation - self.optimizer, peak_train=self.peak_mib(),
                                 peak_generation=self.peak_generation))


def make_trainer(args, output_dir, timer):
    trainer_name, reward, skip = VARIANTS[args.worker]
    settings = dict(
        output_dir=output_dir, use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16",
        model_init_kwargs={"dtype": args.dtype}, activation_checkpointing=args.activation_checkpointing,
        per_device_train_batch_size=args.batch_size, num_generations=args.num_generations,
        gradient_accumulation_steps=args.gradient_accumulation_steps, steps_per_generation=args.steps_per_generation,
        max_completion_length=args.completion_length, generation_kwargs={"min_new_tokens": args.completion_length},
        max_steps=args.rollouts * args.steps_per_generation // args.gradient_accumulation_steps,
        learning_rate=args.learning_rate, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        seed=args.seed,
    )
    # Each trainer's default clip: GRPO epsilon 0.2 in ratio space, both GMPOs 0.4 in log space.
    if trainer_name == "grpo":
        trainer_cls, config = GRPOTrainer, GRPOConfig(loss_type="grpo", **settings)
    elif trainer_name == "gmpo":
        trainer_cls, config = GMPOTrainer, GMPOConfig(skip_zero_advantage_rows=skip, **settings)
    else:
        trainer_cls, config = TRLGMPOTrainer, TRLGMPOConfig(**settings)
    rng = random.Random(args.seed)
    num_prompts = config.max_steps * args.batch_size * args.gradient_accumulation_steps // args.num_generations
    prompts = ["".join(rng.choices("0123456789", k=args.prompt_length)) for _ in range(num_prompts)]
    reward_func = distinct_reward if reward == "distinct" else half_tied_reward_for(args.num_generations)
    return trainer_cls(model=args.model_dir, reward_funcs=reward_func, args=config,
                       train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[timer])


def run_worker(args):
    """Train one variant; print its per-step records, a few logged means and its peak RSS as one JSON line."""
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    timer = PhaseTimer(args.device)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trainer(args, output_dir, timer)
        timer.wrap(trainer)
        trainer.train()
    logged = {}
    for name in ("skipped_rows_frac", "frac_reward_zero_std", "clip_ratio/region_mean"):
        values = [log[name] for log in trainer.state.log_history if name in log]
        logged[name] = statistics.fmean(values) if values else None
    result = {"records": timer.records, "logged": logged,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    print(RESULT_MARKER + json.dumps(result), flush=True)


def launch_worker(name, args, model_dir):
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", name, "--model-dir", model_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"worker {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_MARKER):])


def summarize(result, args):
    """Medians over the steps after the warm-up rollout; generation over the steps that generated."""
    warmup = args.steps_per_generation // args.gradient_accumulation_steps
    records = result["records"]
    timed, nan = records[warmup:], float("nan")
    return {
        "step": statistics.median(r["step"] for r in timed),
        "mean_step": statistics.fmean(r["step"] for r in timed),
        "generation": statistics.median([r["generation"] for r in timed if r["generation"] > 0] or [nan]),
        "fwd_bwd": statistics.median(r["fwd_bwd"] for r in timed),
        "optimizer": statistics.median(r["optimizer"] for r in timed),
        "peak_train": max(r["peak_train"] for r in records),
        "peak_generation": max([r["peak_generation"] for r in records if r["generation"] > 0] or [nan]),
        "peak_rss": result["peak_rss_mib"],
        **result["logged"],
    }


def main():
    # Arguments
    args = parse_args()
    if args.worker:
        return run_worker(args)

    # Setup: one checkpoint for every variant
    model_dir = tempfile.mkdtemp(prefix="gpu-step-model-")
    num_params = build_checkpoint(model_dir, args)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    rollout_rows = args.batch_size * args.steps_per_generation
    print(f"{'tiny Qwen3' if args.tiny else 'Qwen3-0.6B shapes'} ({num_params / 1e6:.1f}M parameters, random), "
          f"{args.dtype}, activation checkpointing {'on' if args.activation_checkpointing else 'off'}, on {device}\n"
          f"prompt {args.prompt_length} + completion {args.completion_length} tokens; micro-batch {args.batch_size}, "
          f"gradient_accumulation_steps {args.gradient_accumulation_steps}, steps_per_generation "
          f"{args.steps_per_generation}: rollouts of {rollout_rows // args.num_generations} prompts x "
          f"{args.num_generations}; {args.rollouts} rollouts (1 warm-up), {args.rounds} round(s)\n{source_state()}",
          flush=True)

    # Loop: rounds of all variants in rotated order, one subprocess each
    runs = {name: [] for name in args.variants}
    for r in range(args.rounds):
        shift = r % len(args.variants)
        for name in args.variants[shift:] + args.variants[:shift]:
            started = time.perf_counter()
            s = summarize(launch_worker(name, args, model_dir), args)
            runs[name].append(s)
            memory = (f"peak {s['peak_train']:.0f} / {s['peak_generation']:.0f} MiB" if args.device == "cuda"
                      else f"RSS {s['peak_rss']:.0f} MiB")
            print(f"[round {r + 1}/{args.rounds}] {name:13s} step {s['step']:.3f} s (generation {s['generation']:.3f}, "
                  f"fwd+bwd {s['fwd_bwd']:.3f}, optimizer {s['optimizer']:.3f}), {memory}, "
                  f"run {time.perf_counter() - started:.0f} s", flush=True)
    shutil.rmtree(model_dir)

    # Report: medians across rounds, ratios against the GRPO baseline, the skip speedup
    med = {n: {k: statistics.median(run[k] for run in runs[n]) for k in [*ROWS, "peak_rss"]} for n in runs}
    logged = {n: {k: runs[n][0][k] for k in ("skipped_rows_frac", "frac_reward_zero_std")} for n in runs}
    print_table(med, ["grpo", "gmpo", "trl-gmpo"], [("gmpo", "grpo"), ("trl-gmpo", "grpo"), ("gmpo", "trl-gmpo")],
                args.device)
    print_table(med, ["gmpo-skip-off", "gmpo-skip-on"], [("gmpo-skip-off", "gmpo-skip-on")], args.device)
    for name, values in logged.items():
        print(f"{name:14s} " + ", ".join(f"{k} {v:.3f}" for k, v in values.items() if v is not None))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "device": device, "medians": med, "runs": runs}, f, indent=2)


def print_table(med, names, ratios, device):
    """Medians of the variants in `names` that ran, then each ratio a / b in `ratios` whose variants both ran
    (skip-off / skip-on is the speedup of skipping)."""
    names, ratios = [n for n in names if n in med], [(a, b) for a, b in ratios if a in med and b in med]
    if not names:
        return
    rows = ROWS if device == "cuda" else {**{k: v for k, v in ROWS.items() if "peak" not in k},
                                          "peak_rss": "peak RSS, process [MiB]"}
    widths = [max(14, len(a) + len(b) + 3) for a, b in ratios]
    print(f"\n{'':30s}" + "".join(f"{n:>14s}" for n in names)
          + "".join(f"{a + '/' + b:>{w}s}" for (a, b), w in zip(ratios, widths)))
    for key, label in rows.items():
        print(f"{label:30s}" + "".join(f"{med[n][key]:14.{0 if 'peak' in key else 3}f}" for n in names)
              + "".join(f"{med[a][key] / med[b][key]:{w}.3f}" for (a, b), w in zip(ratios, widths)))


if __name__ == "__main__":
    main()
