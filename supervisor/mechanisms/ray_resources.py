"""The cluster's GPUs and custom resources, available and total, from the GCS (no driver, milliseconds).

The fence compares what is available after an attempt with what was available before it: a GPU still reserved
(a placement group or an actor of the dead attempt that Ray has not released yet) would make the next attempt's
workers wait for resources that never come. CPUs and memory are not compared: drivers and Ray's own workers come
and go, and a verl job's start-up waits on its GPUs and its custom resources, not on a CPU.
"""

from __future__ import annotations

from collections.abc import Mapping

from supervisor.mechanisms.ray_wire import gcs_channel, gcs_protos

_UNTRACKED = {"CPU", "memory", "object_store_memory"}


def tracked(name: str) -> bool:
    """GPUs and custom resources; not CPU or memory, not Ray's per-node and per-accelerator labels, not the
    resources a placement group's bundles are renamed to (``GPU_group_<id>``), which count inside the group."""
    if name in _UNTRACKED or name.startswith(("node:", "accelerator_type:")):
        return False
    return "_group_" not in name


def cluster_resources(gcs_address: str, timeout_s: float = 10.0) -> tuple[dict[str, float], dict[str, float]]:
    """(available, total) of the tracked resources, summed over the cluster's live nodes."""
    gcs_service_pb2, gcs_service_pb2_grpc = gcs_protos()
    channel = gcs_channel(gcs_address)
    try:
        stub = gcs_service_pb2_grpc.NodeResourceInfoGcsServiceStub(channel)
        available = stub.GetAllAvailableResources(gcs_service_pb2.GetAllAvailableResourcesRequest(), timeout=timeout_s)
        total = stub.GetAllTotalResources(gcs_service_pb2.GetAllTotalResourcesRequest(), timeout=timeout_s)
    finally:
        channel.close()
    return (
        _summed(node.resources_available for node in available.resources_list),
        _summed(node.resources_total for node in total.resources_list),
    )


def _summed(per_node) -> dict[str, float]:
    sums: dict[str, float] = {}
    for resources in per_node:
        for name, amount in resources.items():
            if tracked(name):
                sums[name] = sums.get(name, 0.0) + amount
    return sums


def still_held(before: Mapping[str, float], available: Mapping[str, float]) -> dict[str, float]:
    """What of ``before`` is not available again, by resource (empty: everything is back)."""
    return {
        name: round(amount - available.get(name, 0.0), 6)
        for name, amount in before.items()
        if available.get(name, 0.0) + 1e-6 < amount
    }
