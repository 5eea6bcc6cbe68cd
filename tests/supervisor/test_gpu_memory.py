"""The fence's GPU memory check, with a fake NVML (this machine has no NVIDIA driver; the real one is read where
a GPU is, see the README). The fake behaves as nvidia-ml-py does: NVMLError subclasses, a process list per device
with ``pid`` and ``usedGpuMemory`` in bytes."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from supervisor.backends.base import Stopped, TeardownResult
from supervisor.backends.fence import AttemptView, fence, fence_rules
from supervisor.config import TeardownConfig
from supervisor.mechanisms.gpu_memory import GpuHolder, gpu_memory_holders


class NVMLError(Exception):
    pass


class NVMLErrorLibraryNotFound(NVMLError):
    def __str__(self) -> str:
        return "NVML Shared Library Not Found"


@dataclass
class FakeNvml:
    """``per_call[i]`` is what the devices run at the i-th look (the last one repeats): {device: [(pid, bytes)]}."""

    per_call: list[dict[int, list[tuple[int, int | None]]]]
    driver: bool = True
    looks: int = 0
    shutdowns: int = 0

    NVMLError = NVMLError

    def nvmlInit(self) -> None:
        if not self.driver:
            raise NVMLErrorLibraryNotFound()

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def _now(self) -> dict[int, list[tuple[int, int | None]]]:
        return self.per_call[min(self.looks, len(self.per_call) - 1)]

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list:
        running = [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self._now().get(handle, [])]
        if handle == 1:
            self.looks += 1  # one look reads every device
        return running

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list:
        return []


def test_only_the_attempts_processes_count_as_holders() -> None:
    nvml = FakeNvml([{0: [(101, 2 << 30), (999, 1 << 30)], 1: [(102, None)]}])
    check = gpu_memory_holders({101, 102}, nvml=nvml)
    assert check.skipped is None
    assert check.holders == [GpuHolder(0, 101, 2048.0), GpuHolder(1, 102, None)]
    assert check.summary() == "held: pid 101 on GPU 0, 2048 MB, pid 102 on GPU 1"
    assert nvml.shutdowns == 1


def test_a_machine_without_nvidias_driver_is_skipped_and_says_why() -> None:
    check = gpu_memory_holders({101}, nvml=FakeNvml([{}], driver=False))
    assert check.summary() == "skipped: no NVIDIA driver here (NVML Shared Library Not Found)"
    real = gpu_memory_holders({101})  # this machine: nvidia-ml-py installed, no driver
    assert real.skipped is not None
    assert real.holders == []


def fence_with(nvml: FakeNvml, timeout_s: float, attempt_pids: tuple[int, ...] = ()) -> TeardownResult:
    view = AttemptView(leftovers=list, attempt_pids=attempt_pids, gpu_check=lambda pids: gpu_memory_holders(pids, nvml))
    fenced = fence(view, fence_rules(TeardownConfig(fence_timeout_s=timeout_s), view))
    return TeardownResult.of(Stopped(), fenced, 0.0)


def test_the_fence_waits_until_the_attempts_gpu_memory_is_released() -> None:
    nvml = FakeNvml([{0: [(101, 1 << 30)]}, {0: [(101, 1 << 30)]}, {0: [(7, 1 << 30)]}])
    result = fence_with(nvml, timeout_s=30, attempt_pids=(101,))
    assert result.problems == ()
    assert result.gpu_memory == "free on 2 GPUs"
    assert nvml.looks == 3, "it looked until the attempt's process was gone from the device"


def test_gpu_memory_still_held_at_the_deadline_stops_the_relaunch_naming_the_process() -> None:
    nvml = FakeNvml([{1: [(101, 3 << 30)]}])
    result = fence_with(nvml, timeout_s=0.3, attempt_pids=(101,))
    (problem,) = result.problems
    assert problem == "after 0.3 s, processes of the attempt still hold GPU memory: held: pid 101 on GPU 1, 3072 MB"
    assert result.fenced is False


@pytest.mark.parametrize("driver", [True, False])
def test_nothing_to_check_lets_the_fence_pass(driver: bool) -> None:
    result = fence_with(FakeNvml([{}], driver=driver), timeout_s=5)
    assert result.problems == ()
    assert result.fenced is True
