"""What Ray's state API says about an attempt's job: its id, and which of its actors are still alive."""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveActor:
    actor_id: str
    class_name: str
    state: str
    pid: int | None
    node_id: str | None
    name: str | None = None


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
            address=self.dashboard_url, filters=filters, timeout=self.timeout_s, raise_on_missing_output=False
        )
        return [LiveActor(a.actor_id, a.class_name, a.state, a.pid, a.node_id, a.name or None) for a in actors]

    def job_of_submission(self, submission_id: str) -> str | None:
        """The Ray job id of a Jobs API submission (None until its driver has connected)."""
        for job in self._jobs():
            if job.submission_id == submission_id:
                return job.job_id
        return None

    def check(self) -> None:
        """Raises unless the state API answers (the fence cannot prove anything without it)."""
        from ray.util.state import list_nodes

        list_nodes(address=self.dashboard_url, timeout=self.timeout_s, limit=1, raise_on_missing_output=False)
