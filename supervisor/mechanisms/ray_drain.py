"""Drain a node in Ray, and read which nodes Ray is draining: the calls ``ray drain-node`` and Ray Train's
preemption watcher make.

``ray drain-node`` (ray/scripts/scripts.py, a hidden developer command) sends the GCS's
``AutoscalerStateService.DrainNode`` with a reason, a message and a deadline; the GCS asks the node's raylet,
which from then on refuses new leases and placement-group bundles, and the node shows as draining, then (once
idle, or killed at its deadline by whoever drained it) dead with the reason and message in Ray's own state.
``PREEMPTION`` is the reason a busy node accepts (``IDLE_TERMINATION`` is refused while anything runs there:
"The node to be idle terminated is no longer idle"). The supervisor's own drains give no deadline: nothing is
killed by them.

While a node drains, the GCS tells its deadline (``NodeResourceInfoGcsService.GetDrainingNodes``, what
``ray._private.state.get_draining_nodes`` and ray/train/v2/_internal/execution/preemption.py read) but not its
reason: ``GcsNodeInfo.death_info`` is filled only once the node is dead (Ray 2.60). Made like ``ray_kill``'s
calls: the installed Ray's generated messages, the cluster's TLS and token, no ``import ray``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

import grpc

from supervisor.mechanisms.ray_wire import gcs_channel, gcs_protos, generated

logger = logging.getLogger(__name__)


class DrainReason(str, Enum):
    """``autoscaler_pb2.DrainNodeReason``, without its prefix."""

    PREEMPTION = "PREEMPTION"
    IDLE_TERMINATION = "IDLE_TERMINATION"


@dataclass(frozen=True)
class DrainOutcome:
    node_id: str
    accepted: bool
    message: str = ""
    """Why not, when not accepted."""


def drain_node(
    gcs_address: str,
    node_id: str,
    reason_message: str,
    timeout_s: float = 10.0,
    *,
    reason: DrainReason = DrainReason.PREEMPTION,
    deadline_ms: int = 0,
) -> DrainOutcome:
    """Ask the GCS at ``gcs_address`` to drain ``node_id`` (hex) with ``reason_message``; ``deadline_ms``: when
    the node will be killed, in ms since the epoch (0: no deadline)."""
    autoscaler_pb2, autoscaler_pb2_grpc = generated("autoscaler_pb2"), generated("autoscaler_pb2_grpc")
    request = autoscaler_pb2.DrainNodeRequest(
        node_id=bytes.fromhex(node_id),
        reason=autoscaler_pb2.DrainNodeReason.Value(f"DRAIN_NODE_REASON_{reason.value}"),
        reason_message=reason_message,
        deadline_timestamp_ms=deadline_ms,
    )
    channel = gcs_channel(gcs_address)
    try:
        reply = autoscaler_pb2_grpc.AutoscalerStateServiceStub(channel).DrainNode(request, timeout=timeout_s)
    except grpc.RpcError as exc:
        outcome = DrainOutcome(node_id, False, f"{exc.code().name}: {exc.details()}")
    else:
        outcome = DrainOutcome(node_id, bool(reply.is_accepted), reply.rejection_reason_message)
    finally:
        channel.close()
    logger.info("drain of node %s via GCS %s: accepted=%s %s", node_id, gcs_address, outcome.accepted, outcome.message)
    return outcome


def draining_nodes(gcs_address: str, timeout_s: float = 10.0) -> dict[str, int]:
    """The nodes Ray is draining, each with its deadline in ms since the epoch (0: none). Raises
    ``grpc.RpcError`` when the GCS does not answer."""
    gcs_service_pb2, gcs_service_pb2_grpc = gcs_protos()
    channel = gcs_channel(gcs_address)
    try:
        stub = gcs_service_pb2_grpc.NodeResourceInfoGcsServiceStub(channel)
        reply = stub.GetDrainingNodes(gcs_service_pb2.GetDrainingNodesRequest(), timeout=timeout_s)
    finally:
        channel.close()
    if reply.status.code != 0:
        raise RuntimeError(f"the GCS did not list the draining nodes: {reply.status.message}")
    return {node.node_id.hex(): int(node.draining_deadline_timestamp_ms) for node in reply.draining_nodes}
