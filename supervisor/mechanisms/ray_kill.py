"""Kill Ray actors and remove placement groups by id, on any node, without becoming a Ray driver.

Ray's public ways to kill an actor need its handle (``ray.kill``) or its name (``ray kill-actor``). An actor
that outlives its attempt belongs to a driver that is gone, so its handle is gone too, and it may have no name
(an unnamed detached actor is allowed). What the fence has is the id the state API reports, and the GCS kills
by id: ``KillActorViaGcs`` is the RPC that ``ray.kill`` itself ends in. The call is made with the channel
settings Ray's own clients use (TLS, the token: ``ray_wire``), without importing Ray; it takes milliseconds,
where a throw-away driver (``ray.init``) takes seconds. Whether an actor really died is for the state API to
confirm.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import grpc

from supervisor.mechanisms.ray_wire import gcs_channel, gcs_protos

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
    gcs_service_pb2, gcs_service_pb2_grpc = gcs_protos()

    def kill(stub: Any, actor_id: str) -> Any:
        request = gcs_service_pb2.KillActorViaGcsRequest(
            actor_id=bytes.fromhex(actor_id), force_kill=True, no_restart=True
        )
        return stub.KillActorViaGcs(request, timeout=timeout_s)

    return _each_by_id(
        gcs_address, gcs_service_pb2_grpc.ActorInfoGcsServiceStub, kill, actor_ids, lambda m: _NOT_FOUND in m, "actor"
    )


def remove_placement_groups(gcs_address: str, group_ids: Sequence[str], timeout_s: float = 10.0) -> list[KillOutcome]:
    """Remove each placement group through the GCS (``RemovePlacementGroup``, where
    ``ray.util.remove_placement_group`` ends): its bundles' resources go back to the cluster. A group the GCS no
    longer knows counts as gone."""
    gcs_service_pb2, gcs_service_pb2_grpc = gcs_protos()

    def remove(stub: Any, group_id: str) -> Any:
        request = gcs_service_pb2.RemovePlacementGroupRequest(placement_group_id=bytes.fromhex(group_id))
        return stub.RemovePlacementGroup(request, timeout=timeout_s)

    def gone(message: str) -> bool:
        return "not exist" in message or "not found" in message.lower()

    return _each_by_id(
        gcs_address, gcs_service_pb2_grpc.PlacementGroupInfoGcsServiceStub, remove, group_ids, gone, "placement group"
    )


def _each_by_id(
    gcs_address: str,
    stub_class: Callable[[Any], Any],
    call: Callable[[Any, str], Any],
    ids: Sequence[str],
    gone: Callable[[str], bool],
    what: str,
) -> list[KillOutcome]:
    """One GCS call per id on one channel; each reply's status (or the RPC's error) becomes an outcome."""
    outcomes = []
    channel = gcs_channel(gcs_address)
    try:
        stub = stub_class(channel)
        for target_id in ids:
            try:
                reply = call(stub, target_id)
            except grpc.RpcError as exc:
                outcomes.append(KillOutcome(target_id, KillResult.FAILED, f"{exc.code().name}: {exc.details()}"))
                continue
            if reply.status.code == 0:
                outcomes.append(KillOutcome(target_id, KillResult.KILLED))
            elif gone(reply.status.message):
                outcomes.append(KillOutcome(target_id, KillResult.GONE, reply.status.message))
            else:
                outcomes.append(KillOutcome(target_id, KillResult.FAILED, reply.status.message))
    finally:
        channel.close()
    for outcome in outcomes:
        logger.info(
            "%s %s via GCS %s: %s %s", what, outcome.target_id, gcs_address, outcome.result.value, outcome.message
        )
    return outcomes
