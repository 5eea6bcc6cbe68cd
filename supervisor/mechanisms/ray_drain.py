"""Drain a node in Ray, so that nothing new is placed on it: the call ``ray drain-node`` makes.

``ray drain-node`` (ray/scripts/scripts.py, a hidden developer command) sends the GCS's
``AutoscalerStateService.DrainNode`` with a reason and a message; the GCS asks the node's raylet, which from
then on refuses new leases and placement-group bundles, and the node shows as draining, then (once idle) dead
with the message as its reason, in Ray's own state. ``DRAIN_NODE_REASON_PREEMPTION`` is the reason a busy node
accepts (``IDLE_TERMINATION`` is refused while anything runs there); no deadline is given: nothing is killed by
the drain itself. Made like ``ray_kill``'s calls: the installed Ray's generated messages, the cluster's TLS and
token, no ``import ray``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from supervisor.mechanisms.ray_wire import gcs_channel, generated

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrainOutcome:
    node_id: str
    accepted: bool
    message: str = ""
    """Why not, when not accepted."""


def drain_node(gcs_address: str, node_id: str, reason_message: str, timeout_s: float = 10.0) -> DrainOutcome:
    """Ask the GCS at ``gcs_address`` to drain ``node_id`` (hex) with ``reason_message``."""
    autoscaler_pb2, autoscaler_pb2_grpc = generated("autoscaler_pb2"), generated("autoscaler_pb2_grpc")
    request = autoscaler_pb2.DrainNodeRequest(
        node_id=bytes.fromhex(node_id),
        reason=autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        reason_message=reason_message,
        deadline_timestamp_ms=0,
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
