"""What Ray's state API says about an attempt's job: its id, and which of its actors and placement groups are
still alive. Asked over HTTP without importing Ray (``ray_wire``)."""

from __future__ import annotations

import logging
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from supervisor.mechanisms.ray_wire import auth_headers, list_state

logger = logging.getLogger(__name__)

# The state API returns 100 entries unless told otherwise; a large verl job has more actors than that.
_LIMIT = 10_000


@dataclass(frozen=True)
class LiveActor:
    actor_id: str
    class_name: str
    state: str
    pid: int | None
    node_id: str | None
    name: str | None = None


@dataclass(frozen=True)
class LivePlacementGroup:
    placement_group_id: str
    name: str | None
    state: str
    """PENDING, CREATED or RESCHEDULING: anything but REMOVED holds (or waits for) its bundles' resources."""
    creator_job_id: str | None
    is_detached: bool | None = None


@dataclass(frozen=True)
class NodeInfo:
    """A node of the cluster as the state API describes it."""

    node_id: str
    hostname: str = ""
    ip: str = ""
    is_head: bool = False
    alive: bool = True
    resources: dict[str, float] | None = None
    """Its total resources (None: unknown)."""
    state_message: str = ""
    """Why Ray says it died, or is draining."""


class RayStateClient:
    """A thin client of one cluster's dashboard (state API); every call is bounded by ``timeout_s``."""

    def __init__(self, dashboard_url: str, timeout_s: float = 10.0) -> None:
        self.dashboard_url = dashboard_url
        self.timeout_s = timeout_s

    def _list(self, resource: str, filters: list[tuple[str, str, str]], detail: bool = False) -> list[dict[str, Any]]:
        return list_state(self.dashboard_url, resource, filters, timeout_s=self.timeout_s, limit=_LIMIT, detail=detail)

    def _jobs(self) -> list[dict[str, Any]]:
        return self._list("jobs", [])

    def job_id_of_driver(self, driver_pid: int) -> str | None:
        """The Ray job whose driver is the process ``driver_pid`` (None if it never connected)."""
        for job in self._jobs():
            info = job.get("driver_info")
            if info and str(info.get("pid")) == str(driver_pid):
                return job.get("job_id")
        return None

    def live_actors(self, job_id: str | None = None) -> list[LiveActor]:
        """Actors not yet DEAD, of ``job_id`` or of every job."""
        filters = [("state", "!=", "DEAD")]
        if job_id is not None:
            filters.append(("job_id", "=", job_id))
        return [
            LiveActor(
                a["actor_id"],
                a.get("class_name", ""),
                a["state"],
                a.get("pid"),
                a.get("node_id"),
                a.get("name") or None,
            )
            for a in self._list("actors", filters)
        ]

    def live_placement_groups(self, job_id: str | None = None) -> list[LivePlacementGroup]:
        """Placement groups created by ``job_id`` (None: by any job) and not removed. A detached one outlives its
        job and keeps its bundles' GPUs reserved: the next attempt's workers would wait for them forever."""
        filters = [("state", "!=", "REMOVED")]
        if job_id is not None:
            filters.append(("creator_job_id", "=", job_id))
        return [
            LivePlacementGroup(
                g["placement_group_id"],
                g.get("name") or None,
                str(g["state"]),
                g.get("creator_job_id"),
                g.get("is_detached"),
            )
            for g in self._list("placement_groups", filters, detail=True)
        ]

    def attempt_nodes(self, job_id: str | None) -> dict[str, list[int]]:
        """The live nodes where ``job_id`` ran, each with the pids of the job's actors there (dead ones too: a
        process the kernel is still tearing down holds GPU memory), and the node of its driver. Every live node,
        without pids, when the job is unknown."""
        alive = self._list("nodes", [("state", "=", "ALIVE")])
        live = {node["node_id"] for node in alive}
        if job_id is None:
            return {node: [] for node in sorted(live)}
        nodes: dict[str, list[int]] = {}
        for actor in self._list("actors", [("job_id", "=", job_id)]):
            if actor.get("node_id") in live:
                nodes.setdefault(actor["node_id"], []).extend([actor["pid"]] if actor.get("pid") else [])
        for job in self._jobs():
            driver = job.get("driver_info")
            if job.get("job_id") == job_id and driver:  # it names the driver's address, not node
                for node in alive:
                    if node.get("node_ip") == driver.get("node_ip_address"):
                        nodes.setdefault(node["node_id"], [])
        return nodes

    def nodes(self) -> list[NodeInfo]:
        """Every node the cluster knows, dead ones included."""
        return [
            NodeInfo(
                node["node_id"],
                hostname=node.get("node_name") or "",
                ip=node.get("node_ip") or "",
                is_head=bool(node.get("is_head_node")),
                alive=node.get("state") == "ALIVE",
                resources={k: float(v) for k, v in (node.get("resources_total") or {}).items()},
                state_message=node.get("state_message") or "",
            )
            for node in self._list("nodes", [], detail=True)
        ]

    def nodes_holding(self, job_id: str) -> set[str]:
        """The nodes that hold something of the job now: a live actor, or a bundle of a placement group it
        created that is not removed (reserved, with or without an actor in it)."""
        held = {actor.node_id for actor in self.live_actors(job_id) if actor.node_id}
        filters = [("creator_job_id", "=", job_id), ("state", "!=", "REMOVED")]
        for group in self._list("placement_groups", filters, detail=True):
            held.update(bundle["node_id"] for bundle in group.get("bundles") or [] if bundle.get("node_id"))
        return held

    def job_actor_nodes(self, job_id: str) -> set[str]:
        """Every node where an actor of the job ran, live or dead."""
        return {a["node_id"] for a in self._list("actors", [("job_id", "=", job_id)]) if a.get("node_id")}

    def job_demand(self, job_id: str) -> dict[str, float]:
        """What the job's placement groups reserve (or reserved: removed ones count), summed over their bundles:
        what a relaunch of the same job needs the cluster to hold."""
        demand: dict[str, float] = {}
        for group in self._list("placement_groups", [("creator_job_id", "=", job_id)], detail=True):
            for bundle in group.get("bundles") or []:
                for name, amount in (bundle.get("unit_resources") or {}).items():
                    demand[name] = demand.get(name, 0.0) + float(amount)
        return demand

    def job_of_submission(self, submission_id: str) -> str | None:
        """The Ray job id of a Jobs API submission (None until its driver has connected)."""
        for job in self._jobs():
            if job.get("submission_id") == submission_id:
                return job.get("job_id")
        return None

    def worker_stack(self, node_id: str, pid: int, timeout_s: float) -> str:
        """The Python stacks of a Ray worker process on any node: the dashboard asks that node's agent, which runs
        py-spy on it (``/worker/traceback``, ray/dashboard/modules/reporter/reporter_head.py). Raises on failure."""
        query = urllib.parse.urlencode({"pid": pid, "node_id": node_id, "native": "0"})
        base = self.dashboard_url if "://" in self.dashboard_url else f"http://{self.dashboard_url}"
        request = urllib.request.Request(f"{base}/worker/traceback?{query}", headers=auth_headers())
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # the cluster's own dashboard
            return response.read().decode(errors="replace")

    def check(self) -> None:
        """Raises unless the state API answers (the fence cannot prove anything without it)."""
        list_state(self.dashboard_url, "nodes", timeout_s=self.timeout_s, limit=1)
