"""Train-step time and peak RSS of gmpo.GMPOTrainer vs trl.GRPOTrainer (loss_type="grpo") vs TRL's experimental GMPO.

One tiny Llama and a character tokenizer are built once and saved to a temp dir; every trainer then runs in its own
subprocess (`--worker NAME`), so that each peak RSS (ru_maxrss) belongs to one trainer alone. Rounds interleave the
three trainers in rotated order, and the report takes medians across rounds.

A step is one optimizer step, timed from on_step_begin to on_step_end (generation, loss forward + backward, grad
clip, optimizer). Generation runs once every `steps_per_generation` steps and dominates those steps, so the report
separates the "loss steps" (no generation: where the loss implementations differ) from all steps. On a shared
machine wall time moves with everyone else's load; the CPU time of the (single-threaded) worker is the steadier
number, and the per-round ratios printed with each target show the noise floor.

Same config for all three (off-policy: steps_per_generation 4 > gradient_accumulation_steps 1), except the clip:
GRPOConfig keeps its epsilon 0.2 (ratio space), both GMPO configs their default 0.4 (log space).

    python benchmarks/step_time.py            # default, about 7 minutes on 2 (shared) CPU cores
    python benchmarks/step_time.py --quick    # about a minute: one round, fewer steps
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
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from gmpo import GMPOConfig, GMPOTrainer

with warnings.catch_warnings():  # every worker imports all three trainers, so their peak RSS is comparable
    warnings.simplefilter("ignore")
    from trl.experimental.gmpo import GMPOConfig as TRLGMPOConfig
    from trl.experimental.gmpo import GMPOTrainer as TRLGMPOTrainer

TRAINERS = ("grpo", "gmpo", "trl-gmpo")
RESULT_MARKER = "STEP_TIME_RESULT "
METRICS = {  # summary key -> table label
    "all": "median step [s]",
    "mean": "mean step [s]",
    "gen": "median generation step [s]",
    "loss": "median loss step [s]",
    "loss_cpu": "median loss step, CPU [s]",
    "rss": "peak RSS [MiB]",
}
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
CHARS = list("0123456789+=-* abcdefghij")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of the three trainers")
    p.add_argument("--steps", type=int, default=32, help="optimizer steps per worker run, warm-up included")
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the timings (one generation cycle)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="per_device_train_batch_size (rows per step)")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--steps-per-generation", type=int, default=4, help="> gradient_accumulation_steps (1): off-policy")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="large enough for ratios to reach the clip")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in every worker; 1 because 2 threads on 2 shared cores stall up to 15x")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one round of 8 steps (smoke test, about a minute)")
    p.add_argument("--output", help="optional path for a JSON file with every number")
    p.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)  # internal: run one trainer, print JSON
    p.add_argument("--model-dir", help=argparse.SUPPRESS)  # internal: the checkpoint the parent built
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 2 * args.steps_per_generation
    args.warmup = min(args.warmup, args.steps - 1)
    return args


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A left-padding character tokenizer: one token per character of CHARS, plus SPECIAL."""
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + CHARS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        padding_side="left", truncation_side="left",
    )


def build_tiny_checkpoint(path, hidden_size, num_layers, seed):
    """A random LlamaForCausalLM and the character tokenizer, saved like a hub checkpoint."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def checksum_reward(completions, **kwargs):
    """Cheap, with distinct values inside a group, so that no advantage is exactly 0: gmpo's
    skip_zero_advantage_rows (on by default) then skips nothing and all three trainers forward the same rows.
    (benchmarks/skip_rows.py measures what that switch saves when rewards tie.)"""
    return [sum(i * ord(ch) for i, ch in enumerate(c, 1)) % 997 / 997 for c in completions]


def make_trainer(name, args, output_dir, callback):
    settings = dict(
        output_dir=output_dir, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=args.seed, max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, num_generations=args.num_generations,
        gradient_accumulation_steps=1, steps_per_generation=args.steps_per_generation,
        max_completion_length=args.max_completion_length, learning_rate=args.learning_rate,
        # Every completion runs to max_completion_length, so all trainers do the same work whatever their policy.
        generation_kwargs={"min_new_tokens": args.max_completion_length},
    )
    # GRPO's epsilon is its default 0.2 in ratio space; both GMPO configs keep their default 0.4 in log space.
    if name == "grpo":
        trainer_cls, config = GRPOTrainer, GRPOConfig(loss_type="grpo", **settings)
    elif name == "gmpo":
        trainer_cls, config = GMPOTrainer, GMPOConfig(**settings)
    else:
        trainer_cls, config = TRLGMPOTrainer, TRLGMPOConfig(**settings)
    rng = random.Random(args.seed)
    prompts = [f"{rng.randint(10, 99)}+{rng.randint(10, 99)}=" for _ in range(1024)]
    return trainer_cls(
        model=args.model_dir, reward_funcs=checksum_reward, args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[callback],
    )


class StepTimer(TrainerCallback):
    """Wall and CPU seconds of each optimizer step, and whether it generated a new batch."""

    def __init__(self):
        self.generations, self.times, self.cpu_times, self.generated = 0, [], [], []

    def on_step_begin(self, *_, **__):
        self.generations_before = self.generations
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, *_, **__):
        self.times.append(time.perf_counter() - self.start)
        self.cpu_times.append(time.process_time() - self.cpu_start)
        self.generated.append(self.generations > self.generations_before)


def run_worker(args):
    """Train one trainer, then print its step times, peak RSS and a few logged means as one JSON line."""
    torch.set_num_threads(args.threads)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trainer(args.worker, args, output_dir, timer)
        generate = trainer._generate_and_score_completions

        def counted_generate(*a, **kw):  # marks the steps that generated a new batch
            timer.generations += 1
            return generate(*a, **kw)

        trainer._generate_and_score_completions = counted_generate
        trainer.train()
    logged = {}
    for name in ("clip_ratio/region_mean", "skipped_rows_frac"):
        values = [log[name] for log in trainer.state.log_history if name in log]
        logged[name] = statistics.fmean(values) if values else None
    result = {
        "step_times": timer.times, "cpu_times": timer.cpu_times, "generated": timer.generated, "logged": logged,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
    }
    print(RESULT_MARKER + json.dumps(result), flush=True)


def summarize(result, warmup):
    """Step-time statistics of one worker run, after warm-up: wall for all / generation / loss steps, CPU for loss."""
    timed = list(zip(result["step_times"], result["cpu_times"], result["generated"]))[warmup:]
    loss_steps = [(wall, cpu) for wall, cpu, generated in timed if not generated]
    gen_steps = [wall for wall, _, generated in timed if generated]
    nan = float("nan")
    return {
        "all": statistics.median(wall for wall, _, _ in timed),
        "mean": statistics.fmean(wall for wall, _, _ in timed),
        "gen": statistics.median(gen_steps) if gen_steps else nan,
        "loss": statistics.median(wall for wall, _ in loss_steps) if loss_steps else nan,
        "loss_cpu": statistics.median(cpu for _, cpu in loss_steps) if loss_steps else nan,
        "rss": result["peak_rss_mib"],
        **result["logged"],
    }


def source_state():
    """Which gmpo is measured: the commit of its checkout and whether gmpo/ has uncommitted changes."""
    import trl

    import gmpo

    root = os.path.dirname(os.path.dirname(os.path.abspath(gmpo.__file__)))
    git = ["git", "-C", root]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "gmpo"], capture_output=True, text=True).stdout.strip()
    return (f"gmpo at {commit or 'unknown commit'}{' + uncommitted changes in gmpo/' if dirty else ''}; "
            f"torch {torch.__version__}, trl {trl.__version__}; {time.strftime('%Y-%m-%d %H:%M %Z')}")


def launch_worker(name, args, model_dir):
    forwarded = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (
        "steps", "warmup", "batch_size", "num_generations", "max_completion_length", "steps_per_generation",
        "learning_rate", "threads", "seed")]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model-dir", model_dir, *forwarded]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"worker {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_MARKER):])


def main():
    # Arguments
    args = parse_args()
    if args.worker:
        return run_worker(args)

    # Setup: one checkpoint for all trainers, same seed and config everywhere
    model_dir = tempfile.mkdtemp(prefix="step-time-model-")
    build_tiny_checkpoint(model_dir, args.hidden_size, args.num_layers, args.seed)
    print(f"tiny Llama hidden={args.hidden_size} layers={args.num_layers}; batch {args.batch_size} rows "
          f"({args.num_generations} per prompt), completion {args.max_completion_length} tokens, "
          f"steps_per_generation {args.steps_per_generation}, {args.steps} steps ({args.warmup} warm-up), "
          f"{args.rounds} round(s), {args.threads} torch threads\n{source_state()}", flush=True)

    # Loop: rounds of the three trainers in rotated order, one subprocess each
    runs = {name: [] for name in TRAINERS}
    for r in range(args.rounds):
        for name in TRAINERS[r % 3:] + TRAINERS[:r % 3]:
            started = time.perf_counter()
            summary = summarize(launch_worker(name, args, model_dir), args.warmup)
            runs[name].append(summary)
            print(f"[round {r + 1}/{args.rounds}] {name:8s} step {summary['all']:.3f} s, loss step "
                  f"{summary['loss']:.3f} s (CPU {summary['loss_cpu']:.3f} s), peak RSS {summary['rss']:.0f} MiB, "
                  f"run {time.perf_counter() - started:.0f} s", flush=True)
    shutil.rmtree(model_dir)

    # Report: medians across rounds, ratios, targets
    med = {n: {k: statistics.median(run[k] for run in runs[n]) for k in METRICS} for n in TRAINERS}
    print_table(med, runs)
    print_targets(med, runs)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "medians": med, "runs": runs}, f, indent=2)


def print_table(med, runs):
    ours, grpo, trl_gmpo = med["gmpo"], med["grpo"], med["trl-gmpo"]
    print(f"\nmedians over {len(runs['grpo'])} round(s)")
    print(f"{'':26s}{'GRPO':>9s}{'GMPO(ours)':>12s}{'TRL-GMPO':>10s}{'ours/GRPO':>11s}{'ours/TRL':>10s}")
    for key, label in METRICS.items():
        digits = 0 if key == "rss" else 3
        print(f"{label:26s}{grpo[key]:9.{digits}f}{ours[key]:12.{digits}f}{trl_gmpo[key]:10.{digits}f}"
              f"{ours[key] / grpo[key]:11.3f}{ours[key] / trl_gmpo[key]:10.3f}")
    for name in ("clip_ratio/region_mean", "skipped_rows_frac"):
        values = {n: statistics.median(run[name] for run in runs[n]) for n in TRAINERS if runs[n][0][name] is not None}
        print(f"{name} (mean of logged steps, median of rounds): " + ", ".join(f"{n} {v:.3f}" for n, v in values.items()))


def print_targets(med, runs):
    """Each target on the medians, with the spread of the same ratio over rounds (the machine's noise floor)."""
    targets = [
        ("step time <= 1.02x GRPO", "all", "grpo", 1.02),
        ("loss-step time <= 1.02x GRPO", "loss", "grpo", 1.02),
        ("loss-step CPU time <= 1.02x GRPO", "loss_cpu", "grpo", 1.02),
        ("step time <= 1.00x TRL-GMPO", "all", "trl-gmpo", 1.00),
        ("loss-step time <= 1.00x TRL-GMPO", "loss", "trl-gmpo", 1.00),
        ("loss-step CPU time <= 1.00x TRL-GMPO", "loss_cpu", "trl-gmpo", 1.00),
        ("peak RSS <= 1.01x GRPO", "rss", "grpo", 1.01),
    ]
    print("\ntargets, on the medians above; per-round ratios in brackets:")
    for label, key, base, limit in targets:
        ratio = med["gmpo"][key] / med[base][key]
        per_round = " ".join(f"{o[key] / b[key]:.3f}" for o, b in zip(runs["gmpo"], runs[base]))
        print(f"  {label:38s} {ratio:.3f}  {'met' if ratio <= limit else 'NOT met':8s}[{per_round}]")


if __name__ == "__main__":
    main()
