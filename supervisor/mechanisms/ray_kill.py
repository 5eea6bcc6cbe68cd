"""Kill Ray actors and remove placement groups by id, on any node, without becoming a Ray driver.

Ray's public ways to kill an actor need its handle (``ray.kill``) or its name (``ray kill-actor``). An actor
that outlives its attempt belongs to a driver that is gone, so its handle is gone too, and it may have no name
(an unnamed detached actor is allowed). What the fence has is the id the state API reports, and the GCS kills
by id: ``KillActorViaGcs`` is the RPC that ``ray.kill`` itself ends in. The call goes through Ray's own channel
factory, so TLS and token authentication are what the installed Ray configures; it takes milliseconds, where a
throw-away driver (``ray.init``) takes seconds. Whether an actor really died is for the state API to confirm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

logger = logging.getLogger(__name__)

_NOT_FOUND = "Could not find actor"


class KillResult(str, Enum):
    KILLED = "killed"
    """The GCS accepted the kill (force, no restart)."""
    GONE = "gone"
    """The GCS no longer knows the actor."""
    FAILED = "failed"
    """The GCS did not answer or refused; ``message`` says why."""


@dataclass(frozen=True)
class KillOutcome:
    target_id: str
    """The actor's or the placement group's id."""
    result: KillResult
    message: str = ""


def kill_actors(gcs_address: str, actor_ids: Sequence[str], timeout_s: float = 10.0) -> list[KillOutcome]:
    """Force-kill each actor through the GCS at ``gcs_address`` (host:port), never restarting it."""
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    outcomes = []
    channel = init_grpc_channel(gcs_address)
    try:
        stub = gcs_service_pb2_grpc.ActorInfoGcsServiceStub(channel)
        for actor_id in actor_ids:
            request = gcs_service_pb2.KillActorViaGcsRequest(
                actor_id=bytes.fromhex(actor_id), force_kill=True, no_restart=True
            )
            try:
                reply = stub.KillActorViaGcs(request, timeout=timeout_s)
            except grpc.RpcError as exc:
                outcomes.append(KillOutcome(actor_id, KillResult.FAILED, f"{exc.code().name}: {exc.details()}"))
                continue
            if reply.status.code == 0:
                outcomes.append(KillOutcome(actor_id, KillResult.KILLED))
            elif _NOT_FOUND in reply.status.message:
                outcomes.append(KillOutcome(actor_id, KillResult.GONE, reply.status.message))
            else:
                outcomes.append(KillOutcome(actor_id, KillResult.FAILED, reply.status.message))
    finally:
        channel.close()
    for outcome in outcomes:
        logger.info("actor %s via GCS %s: %s %s", outcome.target_id, gcs_address, outcome.result.value, outcome.message)
    return outcomes


def remove_placement_groups(gcs_address: str, group_ids: Sequence[str], timeout_s: float = 10.0) -> list[KillOutcome]:
    """Remove each placement group through the GCS (``RemovePlacementGroup``, where
    ``ray.util.remove_placement_group`` ends): its bundles' resources go back to the cluster. A group the GCS no
    longer knows counts as gone."""
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    outcomes = []
    channel = init_grpc_channel(gcs_address)
    try:
        stub = gcs_service_pb2_grpc.PlacementGroupInfoGcsServiceStub(channel)
        for group_id in group_ids:
            request = gcs_service_pb2.RemovePlacementGroupRequest(placement_group_id=bytes.fromhex(group_id))
            try:
                reply = stub.RemovePlacementGroup(request, timeout=timeout_s)
            except grpc.RpcError as exc:
                outcomes.append(KillOutcome(group_id, KillResult.FAILED, f"{exc.code().name}: {exc.details()}"))
                continue
            if reply.status.code == 0:
                outcomes.append(KillOutcome(group_id, KillResult.KILLED))
            elif "not exist" in reply.status.message or "not found" in reply.status.message.lower():
                outcomes.append(KillOutcome(group_id, KillResult.GONE, reply.status.message))
            else:
                outcomes.append(KillOutcome(group_id, KillResult.FAILED, reply.status.message))
    finally:
        channel.close()
    for outcome in outcomes:
        logger.info(
            "placement group %s via GCS %s: %s %s",
            outcome.target_id,
            gcs_address,
            outcome.result.value,
            outcome.message,
        )
    return outcomes
