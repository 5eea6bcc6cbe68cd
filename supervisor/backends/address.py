"""``ray.mode=address``: join an existing (multi-node) Ray cluster; the job's driver is the supervisor's child.

The supervisor owns nothing of the cluster: teardown stops only the attempt's driver (and its processes on this
machine), then proves through the state API that no actor of the attempt's Ray job is alive on any node,
killing stragglers by id. Checkpoints must be on storage that this machine and the cluster's nodes share.
"""

from __future__ import annotations

from supervisor.backends.base import ClusterStartFailed
from supervisor.backends.child_driver import ChildDriverBackend
from supervisor.config import RayConfig, TeardownConfig
from supervisor.processes import port_open
from supervisor.ray_state import RayStateClient


class AddressBackend(ChildDriverBackend):
    def __init__(self, ray: RayConfig, teardown: TeardownConfig, run_id: str, echo_output: bool = True) -> None:
        super().__init__(ray, teardown, run_id, echo_output)
        assert ray.address is not None, "resolve_cluster() first"
        assert ray.dashboard_url is not None, "resolve_cluster() first"
        self._gcs = ray.address
        self._state = RayStateClient(ray.dashboard_url)

    def gcs_address(self) -> str:
        return self._gcs

    def state_client(self) -> RayStateClient:
        return self._state

    def cluster_down(self) -> bool:
        host, _, port = self._gcs.rpartition(":")
        return not port_open(host, int(port))

    def prepare(self) -> None:
        if self.cluster_down():
            raise ClusterStartFailed(f"the Ray cluster at {self._gcs} (ray.address) does not answer")
        try:
            self._state.check()
        except Exception as exc:
            raise ClusterStartFailed(
                f"the Ray dashboard at {self._state.dashboard_url} does not answer ({exc}); the fence needs its "
                f"state API: set ray.dashboard_url"
            ) from exc

    def close(self) -> None:
        pass  # the cluster is not ours
