"""The weight sync that vLLM's CPU backend needs in colocate mode.

TRL's `VLLMGeneration.sync_weights` loads each parameter into vLLM's model in place (`model.load_weights`). vLLM's
CPU backend repacks every linear weight for its kernels once the model is loaded, which drops the `weight_loader`
those in-place loads go through (`AttributeError: 'Parameter' object has no attribute 'weight_loader'`). The worker's
`reload_weights(weights_iterator=..., is_checkpoint_format=True)` restores the checkpoint layout, loads the weights
and repacks them again, except for a layer that got no weight of its own: an LM head tied to the input embedding,
whose packed copy is then built again from the embedding's new values. On every other platform, and in server mode,
TRL's own sync is kept.
"""

import importlib.util
import types


def needs_reload_sync(generation) -> bool:
    """Whether `generation` (TRL's VLLMGeneration) runs an in-process vLLM on the CPU platform."""
    if generation.mode != "colocate":
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def sync_by_reload(generation) -> None:
    """Push the trainer's weights into the colocated vLLM engine through the worker's reload path, then drop vLLM's
    prefix cache (its KV entries were computed with the old weights).

    The weights come from TRL's own iterator (`_iter_named_params`): the names vLLM expects, PEFT adapters merged
    and unmerged around the pass, ZeRO-3 parameters gathered one at a time on every process.
    """
    worker = generation.llm.llm_engine.model_executor.driver_worker
    worker.reload_weights(weights_iterator=generation._iter_named_params(), is_checkpoint_format=True)
    repack_tied_lm_heads(worker.model_runner.get_model())
    generation.llm.reset_prefix_cache()


def repack_tied_lm_heads(model) -> int:
    """Rebuild the CPU kernel of every LM head that shares its weight with an input embedding; how many there were.

    Checkpoints of tied models hold no `lm_head.weight`, so the reload leaves the head's packed copy as it was, while
    the shared weight tensor holds the new embedding.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = {id(module.weight) for module in model.modules()
                  if isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead)}
    tied = [module for module in model.modules()
            if isinstance(module, ParallelLMHead) and id(getattr(module, "weight", None)) in embeddings]
    for head in tied:
        head.quant_method.process_weights_after_loading(head)
    return len(tied)


def use_reload_sync_where_needed(generation) -> bool:
    """Make `generation.sync_weights` the reload sync when TRL's cannot work here; True when it did."""
    if not needs_reload_sync(generation):
        return False
    generation.sync_weights = types.MethodType(sync_by_reload, generation)
    return True


def vllm_platform_problem(args) -> str | None:
    """Why TRL 1.16 cannot run the vLLM mode `args` (a GRPOConfig) asks for on this machine, or None.

    Server mode: TRL's client syncs the server's weights only over NCCL, from a CUDA device. Sleep mode: vLLM refuses
    it where its platform has none (CPU), and would do so only once the engine starts.
    """
    if not args.use_vllm:
        return None
    if args.vllm_mode == "server" and args.device.type != "cuda":
        return (
            f"vllm_mode='server' needs a CUDA device, and this process trains on {args.device.type!r}: TRL 1.16 "
            "syncs the server's weights only over NCCL. Use vllm_mode='colocate' (vLLM in the training process), "
            "which runs on CPU too."
        )
    if args.vllm_mode == "colocate" and args.vllm_enable_sleep_mode and importlib.util.find_spec("vllm"):
        from vllm.platforms import current_platform

        if not current_platform.is_sleep_mode_available():
            return (
                f"vllm_enable_sleep_mode=True: vLLM has no sleep mode on this platform "
                f"({current_platform.device_name or current_platform.device_type}); set vllm_enable_sleep_mode=False "
                "(colocate mode runs without it)."
            )
    return None
