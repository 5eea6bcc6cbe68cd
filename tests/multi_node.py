"""A multi-node Ray cluster on one machine, for tests: the supervisor's own embedded cluster with more raylets
joined to it. Test code: the supervisor never adds nodes to a cluster."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from supervisor.mechanisms import ray_cluster
from supervisor.mechanisms.processes import ChildProcess, TerminationReport, start_child, tail, wait_for
from supervisor.mechanisms.ray_cluster import ClusterStartError, LocalRayCluster


class MultiNodeCluster(LocalRayCluster):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._nodes: list[ChildProcess] = []

    def stop(self, grace_s: float, reap_timeout_s: float = ray_cluster.REAP_TIMEOUT_S) -> TerminationReport:
        """Each joined node's ``ray start`` is signalled with the head's; the cluster's stop ends them (they carry
        its marker) and they are reaped here, as the cluster reaps its head's."""
        for node in self._nodes:
            if node.poll() is None:
                os.kill(node.pid, signal.SIGTERM)
        report = super().stop(grace_s, reap_timeout_s)
        for node in self._nodes:
            node.wait(timeout_s=reap_timeout_s)
        self._nodes = []
        return report

    def add_node(self, num_cpus: int, resources: dict[str, float] | None = None, num_gpus: int | None = None) -> None:
        """Another raylet on this machine joining the cluster, with ports and a temp dir of its own. It carries
        the cluster's marker, so ``stop`` ends it."""
        assert self.temp_dir is not None, "start() first"
        index = len(self._nodes) + 1
        temp_dir = Path(f"{self.temp_dir}-n{index}")
        temp_dir.mkdir(parents=True, exist_ok=True)
        if self._away:
            self._short_dir(temp_dir)
        errors = []
        for attempt in range(1, self.spec.start_attempts + 1):
            error = self._start_node(index, attempt, temp_dir, num_cpus, resources, num_gpus)
            if error is None:
                break
            # It exited before joining: most often a port taken between choosing it and binding it.
            errors.append(error)
        else:
            raise ClusterStartError(
                f"node {index} did not join after {self.spec.start_attempts} attempts:\n" + "\n---\n".join(errors)
            )
        self._remember_core()

    def _start_node(
        self,
        index: int,
        attempt: int,
        temp_dir: Path,
        num_cpus: int,
        resources: dict[str, float] | None,
        num_gpus: int | None,
    ) -> str | None:
        """Starts node ``index`` and waits until it has joined (None) or has exited (what its log said)."""
        ports = ray_cluster.free_ports(6, self.spec.node_ip)  # looked up here: a test replaces it
        options = [
            f"--address={self.address}",
            f"--node-manager-port={ports[0]}",
            f"--object-manager-port={ports[1]}",
            f"--dashboard-agent-listen-port={ports[2]}",
            f"--dashboard-agent-grpc-port={ports[3]}",
            f"--metrics-export-port={ports[4]}",
            f"--runtime-env-agent-port={ports[5]}",
        ]
        log_path = temp_dir / f"ray-start-{attempt}.log"
        command = self._ray_start(temp_dir, num_cpus, options, num_gpus=num_gpus, resources=resources)
        with log_path.open("wb") as log:
            node = start_child(command, env=self._env(), stdout=log, stderr=log)
        self._nodes.append(node)
        timeout_s = self.spec.start_timeout_s
        if not wait_for(lambda: node.poll() is not None or "Ray runtime started" in tail(log_path), timeout_s):
            raise ClusterStartError(f"node {index} did not join in {timeout_s:g} s:\n{tail(log_path, 4000)}")
        if node.poll() is None:
            return None
        self._nodes.remove(node)
        return tail(log_path, 4000)
