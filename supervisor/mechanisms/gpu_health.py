"""Whether this machine's NVIDIA GPUs are fit to run the next attempt, read from NVML (``nvidia-ml-py``) and a
short compute check.

A failure caused by hardware comes back on the relaunch if the relaunch lands on the same hardware: a GPU with
uncorrectable ECC errors, one that fell off the bus, one whose pages wait to be retired or whose row remapping
failed, one the hardware slows down (thermal or power-brake slowdown). These are the checks NVIDIA's own
health tooling (DCGM's diagnostics, the resiliency extension's health checks) starts from; each reads one NVML
query, and a query a GPU does not support (``NVMLError_NotSupported``, e.g. no ECC on a consumer card) is
reported as unknown, never as a fault. The compute check runs a small matmul on each device against its known
result in a daemon thread, so a GPU that hangs cannot hang the probe: past its time limit it is a fault.

Like ``gpu_memory``, this module depends on nothing else of the supervisor: ``node_probe`` ships it by value to
the cluster's nodes. Whether what it reads is a fault is ``supervisor.policy.nodes``'s judgement.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

from supervisor.mechanisms.gpu_memory import NvmlUnavailable, nvml_open

# nvmlClocksThrottleReasons / nvmlClocksEventReasons bits that mean the hardware itself slows the GPU down.
HW_SLOWDOWN_REASONS = {0x8: "hardware slowdown", 0x40: "hardware thermal slowdown", 0x80: "hardware power brake"}
_NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
_NVML_VOLATILE_ECC = 0
_NVML_FEATURE_ENABLED = 1
COMPUTE_CHECK_SIZE = 256


@dataclass(frozen=True)
class GpuReading:
    """One GPU as NVML and the compute check saw it. None: not supported or not read."""

    index: int
    uuid: str | None = None
    unreachable: str | None = None
    """Why NVML could not reach the device (fallen off the bus, lost): then nothing else was read."""
    ecc_uncorrected_volatile: int | None = None
    """Uncorrectable ECC errors since the driver loaded."""
    retired_pages_pending: bool | None = None
    remap_failure: bool | None = None
    remap_pending: bool | None = None
    slowdown: tuple[str, ...] = ()
    """The hardware slowdown reasons active now."""
    compute: str | None = None
    """What the compute check found wrong (None: right, or not run: see ``NodeReading.compute_skipped``)."""


@dataclass(frozen=True)
class NodeReading:
    """This machine's GPUs."""

    skipped: str | None = None
    """Why no GPU was read (no NVIDIA driver here); None when NVML answered."""
    gpus: tuple[GpuReading, ...] = ()
    compute_skipped: str | None = None
    """Why no compute check ran (no CUDA device visible to torch, no torch)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> NodeReading:
        if not data:
            return cls(skipped="not read")
        gpus = tuple(GpuReading(**{**gpu, "slowdown": tuple(gpu.get("slowdown", ()))}) for gpu in data.get("gpus", []))
        return cls(skipped=data.get("skipped"), gpus=gpus, compute_skipped=data.get("compute_skipped"))


@dataclass
class _Compute:
    problems: dict[int, str] = field(default_factory=dict)
    skipped: str | None = None


def read_node(nvml: ModuleType | None = None, compute_timeout_s: float = 0.0) -> NodeReading:
    """Read every GPU of this machine, then run the compute check on those NVML could reach (within
    ``compute_timeout_s``; 0: none)."""
    try:
        with nvml_open(nvml) as lib:
            try:
                readings = [_read_gpu(lib, index) for index in range(lib.nvmlDeviceGetCount())]
            except lib.NVMLError as exc:
                return NodeReading(skipped=f"NVML could not count the GPUs ({exc})")
    except NvmlUnavailable as exc:
        return NodeReading(skipped=str(exc))
    compute = _compute_check([g.index for g in readings if g.unreachable is None], compute_timeout_s)
    gpus = tuple(
        GpuReading(**{**asdict(g), "slowdown": g.slowdown, "compute": compute.problems.get(g.index)}) for g in readings
    )
    return NodeReading(gpus=gpus, compute_skipped=compute.skipped)


def _read_gpu(nvml: ModuleType, index: int) -> GpuReading:
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except nvml.NVMLError as exc:
        return GpuReading(index, unreachable=str(exc) or type(exc).__name__)

    def ask(query: Callable[[], Any]) -> Any:
        try:
            return query()
        except (nvml.NVMLError, AttributeError):  # not supported by this GPU or this binding: unknown, not a fault
            return None

    uuid = ask(lambda: nvml.nvmlDeviceGetUUID(handle))
    ecc = ask(lambda: nvml.nvmlDeviceGetTotalEccErrors(handle, _NVML_MEMORY_ERROR_TYPE_UNCORRECTED, _NVML_VOLATILE_ECC))
    pending = ask(lambda: nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle))
    remapped = ask(lambda: nvml.nvmlDeviceGetRemappedRows(handle))  # (corrected, uncorrected, pending, failure)
    reasons_of = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
        nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
    )
    reasons = ask(lambda: reasons_of(handle)) if reasons_of is not None else None
    return GpuReading(
        index,
        uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
        ecc_uncorrected_volatile=None if ecc is None else int(ecc),
        retired_pages_pending=None if pending is None else int(pending) == _NVML_FEATURE_ENABLED,
        remap_pending=None if remapped is None else bool(remapped[2]),
        remap_failure=None if remapped is None else bool(remapped[3]),
        slowdown=tuple(name for bit, name in HW_SLOWDOWN_REASONS.items() if reasons is not None and int(reasons) & bit),
    )


# Run as ``python -c`` in a child process: a hung device hangs the child, never the probe, which kills it at the
# time limit; and no CUDA context is left in the probe's (pooled) Ray worker or in the supervisor.
_COMPUTE_SCRIPT = """
import json, sys
import torch
n, found = int(sys.argv[2]), {}
if not torch.cuda.is_available():
    print(json.dumps({"skipped": "no CUDA device visible to torch"}), flush=True)
    sys.exit(0)
for index in json.loads(sys.argv[1]):
    try:
        ones = torch.ones((n, n), dtype=torch.float32, device=f"cuda:{index}")
        total = float((ones @ ones).sum().item())
        if total != float(n ** 3):
            found[index] = f"a {n}x{n} matmul of ones summed to {total:g}, not {n ** 3}"
    except Exception as exc:
        found[index] = f"the matmul failed: {type(exc).__name__}: {str(exc)[:200]}"
print(json.dumps({"problems": found}), flush=True)
"""


def _compute_check(indices: list[int], timeout_s: float) -> _Compute:
    """A matmul of a known matrix on each device, checked against its known result (every entry of ones @ ones is
    n, n**3 in all: exact in float32), in a child process that sees every GPU of the machine."""
    if not indices:
        return _Compute(skipped="no GPU to check")
    if timeout_s <= 0:
        return _Compute(skipped="no time left for it in the sweep")
    if importlib.util.find_spec("torch") is None:
        return _Compute(skipped="torch is not installed here")
    # Ray gives a task that asks for no GPU an empty CUDA_VISIBLE_DEVICES: the check must see the devices NVML saw.
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    argv = [sys.executable, "-c", _COMPUTE_SCRIPT, json.dumps(indices), str(COMPUTE_CHECK_SIZE)]
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        hung = f"a {COMPUTE_CHECK_SIZE}-square matmul did not finish in {timeout_s:g} s"
        return _Compute(problems={index: hung for index in indices})
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        last = (done.stderr or "").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return _Compute(problems={index: f"the check failed: {last[0][:200]}" for index in indices})
    if "skipped" in answer:
        return _Compute(skipped=answer["skipped"])
    return _Compute(problems={int(index): problem for index, problem in answer["problems"].items()})
