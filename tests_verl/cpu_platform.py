"""A CPU platform for verl 0.9.1, so that its FSDP engine runs on CPU with gloo (tests only).

verl 0.9.1 resolves its device through `verl.plugin.platform` (registered platforms: CUDA, NPU, ROCm) and, with no
accelerator, falls back to CUDA, so `init_device_mesh("cuda", ...)` fails on a CPU machine. Its platform registry is
the extension point for other hardware: this module registers a "cpu" platform and makes it current. Import it
before anything imports `verl.workers` (verl's engine module reads the device name at import time).
"""

import contextlib
import os

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry, set_platform


class CPUDeviceModule:
    """torch.cpu plus the `torch.cuda` calls verl makes on its device module, answered for host memory.

    Memory statistics are 0 (no device allocator), `mem_get_info` is (available, total) host memory, the RNG state is
    torch's default generator's, and cache / IPC / memory-fraction calls do nothing.
    """

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    def get_device_name(self, device=None) -> str:
        return "CPU"

    def empty_cache(self) -> None:
        pass

    def ipc_collect(self) -> None:
        pass

    def set_per_process_memory_fraction(self, fraction, device=None) -> None:
        pass

    def memory_allocated(self, device=None) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    def mem_get_info(self, device=None) -> tuple[int, int]:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    def get_rng_state(self, device=None) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state, device=None) -> None:
        torch.set_rng_state(state)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """Device "cpu", collective backend gloo, no-op device management and profiling, no CUDA IPC.

    Ray schedules verl's workers and rollout servers on "GPU" resources: a CPU launch declares logical GPUs
    (`ray_init.num_gpus`), which only count slots. Without IPC verl sends weights to vLLM through shared memory.
    """

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self):
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        pass

    def synchronize(self, device_index=None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CPU_VISIBLE_DEVICES"

    def nvtx_range(self, msg: str):
        return contextlib.nullcontext()

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


_DEVICE_MODULE = CPUDeviceModule()


def use_cpu_platform() -> None:
    set_platform(PlatformCPU())
