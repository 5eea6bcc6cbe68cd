"""What Ray's state API says about an attempt's job: its id, and which of its actors and placement groups are
still alive."""

from __future__ import annotations

import logging
from dataclasses import dataclass

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


class RayStateClient:
    """A thin client of one cluster's dashboard (state API); every call is bounded by ``timeout_s``."""

    def __init__(self, dashboard_url: str, timeout_s: float = 10.0) -> None:
        self.dashboard_url = dashboard_url
        self.timeout_s = timeout_s

    def _jobs(self) -> list:
        from ray.util.state import list_jobs

        return list_jobs(address=self.dashboard_url, timeout=self.timeout_s, raise_on_missing_output=False)

    def job_id_of_driver(self, driver_pid: int) -> str | None:
        """The Ray job whose driver is the process ``driver_pid`` (None if it never connected)."""
        for job in self._jobs():
            info = job.driver_info
            if info is not None and str(info.pid) == str(driver_pid):
                return job.job_id
        return None

    def live_actors(self, job_id: str | None = None) -> list[LiveActor]:
        """Actors not yet DEAD, of ``job_id`` or of every job."""
        from ray.util.state import list_actors

        filters = [("state", "!=", "DEAD")]
        if job_id is not None:
            filters.append(("job_id", "=", job_id))
        actors = list_actors(
            address=self.dashboard_url,
            filters=filters,
            timeout=self.timeout_s,
            limit=_LIMIT,
            raise_on_missing_output=False,
        )
        return [LiveActor(a.actor_id, a.class_name, a.state, a.pid, a.node_id, a.name or None) for a in actors]

    def live_placement_groups(self, job_id: str | None = None) -> list[LivePlacementGroup]:
        """Placement groups created by ``job_id`` (None: by any job) and not removed. A detached one outlives its
        job and keeps its bundles' GPUs reserved: the next attempt's workers would wait for them forever."""
        from ray.util.state import list_placement_groups

        filters = [("state", "!=", "REMOVED")]
        if job_id is not None:
            filters.append(("creator_job_id", "=", job_id))
        groups = list_placement_groups(
            address=self.dashboard_url,
            filters=filters,
            timeout=self.timeout_s,
            detail=True,
            limit=_LIMIT,
            raise_on_missing_output=False,
        )
        return [
            LivePlacementGroup(g.placement_group_id, g.name or None, str(g.state), g.creator_job_id, g.is_detached)
            for g in groups
        ]

    def attempt_nodes(self, job_id: str | None) -> dict[str, list[int]]:
        """The live nodes where ``job_id`` ran, each with the pids of the job's actors there (dead ones too: a
        process the kernel is still tearing down holds GPU memory), and the node of its driver. Every live node,
        without pids, when the job is unknown."""
        from ray.util.state import list_actors, list_nodes

        alive = list_nodes(
            address=self.dashboard_url,
            filters=[("state", "=", "ALIVE")],
            timeout=self.timeout_s,
            limit=_LIMIT,
            raise_on_missing_output=False,
        )
        live = {node.node_id for node in alive}
        if job_id is None:
            return {node: [] for node in sorted(live)}
        actors = list_actors(
            address=self.dashboard_url,
            filters=[("job_id", "=", job_id)],
            timeout=self.timeout_s,
            limit=_LIMIT,
            raise_on_missing_output=False,
        )
        nodes: dict[str, list[int]] = {}
        for actor in actors:
            if actor.node_id in live:
                nodes.setdefault(actor.node_id, []).extend([actor.pid] if actor.pid else [])
        for job in self._jobs():
            if job.job_id == job_id and job.driver_info is not None:  # it names the driver's address, not node
                for node in alive:
                    if node.node_ip == job.driver_info.node_ip_address:
                        nodes.setdefault(node.node_id, [])
        return nodes

    def job_of_submission(self, submission_id: str) -> str | None:
        """The Ray job id of a Jobs API submission (None until its driver has connected)."""
        for job in self._jobs():
            if job.submission_id == submission_id:
                return job.job_id
        return None

    def worker_stack(self, node_id: str, pid: int, timeout_s: float) -> str:
        """The Python stacks of a Ray worker process on any node: the dashboard asks that node's agent, which runs
        py-spy on it (``/worker/traceback``, ray/dashboard/modules/reporter/reporter_head.py). Raises on failure."""
        import urllib.parse
        import urllib.request

        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

        query = urllib.parse.urlencode({"pid": pid, "node_id": node_id, "native": "0"})
        request = urllib.request.Request(
            f"{self.dashboard_url}/worker/traceback?{query}", headers=get_auth_headers_if_auth_enabled({})
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # the cluster's own dashboard
            return response.read().decode(errors="replace")

    def check(self) -> None:
        """Raises unless the state API answers (the fence cannot prove anything without it)."""
        from ray.util.state import list_nodes

        list_nodes(address=self.dashboard_url, timeout=self.timeout_s, limit=1, raise_on_missing_output=False)
