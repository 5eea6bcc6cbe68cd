"""Which processes of an attempt still hold GPU memory on this machine, read from NVML (``nvidia-ml-py``).

A process that was SIGKILLed is not always gone from the GPU at once: the driver releases its memory when the
process is fully torn down, and a process stuck in the kernel (uninterruptible sleep, a hung collective) can hold
it for a long time. A relaunch next to it fails with out-of-memory on the device, or waits. So the fence asks
NVML which processes hold memory on each device and waits (bounded) until none of the attempt's does.

On a machine without NVIDIA's driver the check is skipped, and says why.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from types import ModuleType

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuHolder:
    device: int
    pid: int
    used_mb: float | None
    """None: the driver does not say (some drivers hide it)."""

    def describe(self) -> str:
        used = "" if self.used_mb is None else f", {self.used_mb:.0f} MB"
        return f"pid {self.pid} on GPU {self.device}{used}"


@dataclass(frozen=True)
class GpuMemoryCheck:
    skipped: str | None = None
    """Why nothing was checked (no NVIDIA driver on this machine); None when the devices were read."""
    devices: int = 0
    holders: list[GpuHolder] = field(default_factory=list)
    """The attempt's processes that hold memory on a device."""

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        if not self.holders:
            return f"free on {self.devices} GPUs"
        return "held: " + ", ".join(holder.describe() for holder in self.holders)


def nvml_binding() -> ModuleType | None:
    """nvidia-ml-py, else the copy Ray ships; None when neither is installed."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        try:  # on a Ray node without nvidia-ml-py: the copy Ray's own GPU metrics read NVML with
            import ray._private.thirdparty.pynvml as pynvml
        except ImportError:
            return None
    return pynvml


class NvmlUnavailable(Exception):
    """Why NVML cannot be read on this machine (no binding installed, no NVIDIA driver)."""


@contextlib.contextmanager
def nvml_open(nvml: ModuleType | None = None) -> Iterator[ModuleType]:
    """NVML initialised for the block and shut down after it; raises ``NvmlUnavailable`` saying why not."""
    nvml = nvml if nvml is not None else nvml_binding()
    if nvml is None:
        raise NvmlUnavailable("no NVML binding (nvidia-ml-py) is installed")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise NvmlUnavailable(f"no NVIDIA driver here ({exc})") from None
    try:
        yield nvml
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            logger.debug("nvmlShutdown: %s", exc)


def gpu_memory_holders(pids: Collection[int], nvml: ModuleType | None = None) -> GpuMemoryCheck:
    """The processes among ``pids`` holding memory on this machine's NVIDIA GPUs."""
    wanted = set(pids)
    holders = []
    try:
        with nvml_open(nvml) as lib:
            try:
                count = lib.nvmlDeviceGetCount()
                for index in range(count):
                    handle = lib.nvmlDeviceGetHandleByIndex(index)
                    running = [
                        *lib.nvmlDeviceGetComputeRunningProcesses(handle),
                        *lib.nvmlDeviceGetGraphicsRunningProcesses(handle),
                    ]
                    for process in running:
                        if process.pid in wanted:
                            used = getattr(process, "usedGpuMemory", None)
                            holders.append(GpuHolder(index, process.pid, None if used is None else used / 2**20))
            except lib.NVMLError as exc:
                return GpuMemoryCheck(skipped=f"NVML could not list the GPUs' processes ({exc})")
    except NvmlUnavailable as exc:
        return GpuMemoryCheck(skipped=str(exc))
    return GpuMemoryCheck(devices=count, holders=holders)
