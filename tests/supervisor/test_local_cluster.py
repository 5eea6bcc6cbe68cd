"""The embedded Ray cluster's stop ends every process it started, those without a readable marker included."""

from __future__ import annotations

import contextlib
import signal
import tempfile
from pathlib import Path

import psutil
import pytest

from supervisor.mechanisms.processes import wait_for
from supervisor.mechanisms.ray_cluster import ClusterSpec, LocalRayCluster


def raylet_of(cluster: LocalRayCluster) -> psutil.Process:
    found = [p for p in cluster.processes() if p.name() == "raylet"]
    assert len(found) == 1, [p.cmdline()[:1] for p in cluster.processes()]
    return found[0]


@pytest.mark.ray
def test_a_cluster_whose_gcs_died_is_stopped_with_its_agents(tmp_path: Path) -> None:
    """Ray's dashboard and runtime-env agents, children of the raylet, rewrite their title over their environment:
    no marker can be read from them. With the GCS dead `ray start` kills the raylet, and the orphaned agents would
    wait forever after the cluster's stop."""
    announced: list[psutil.Process] = []
    cluster = LocalRayCluster(ClusterSpec(temp_dir=tmp_path / "ray", num_cpus=1), on_unmarked=announced.extend)
    cluster.start()
    agents: list[psutil.Process] = []
    try:
        raylet = raylet_of(cluster)
        agents = [c for c in raylet.children() if cluster.marker.items() - c.environ().items()]
        assert agents, "the raylet's agents carry no readable marker (else this test tests nothing)"
        cluster.processes()  # a raylet child may start after the look above (under load): the cluster looks again
        assert {a.pid for a in agents} <= {p.pid for p in announced}, "announced (to the reaper) once seen"
        gcs = next(p for p in cluster.processes() if p.name() == "gcs_server")
        gcs.send_signal(signal.SIGKILL)
        gcs.wait(timeout=10)
        # `ray start --block` sees it and kills the raylet: the agents are orphans, no one's descendants.
        assert wait_for(lambda: cluster._process is not None and cluster._process.poll() is not None, 60)
        assert wait_for(lambda: all(a.ppid() != raylet.pid for a in agents if a.is_running()), 60)

        report = cluster.stop(grace_s=2.0)

        assert not report.survivors
        assert not [a for a in agents if a.is_running() and a.status() != psutil.STATUS_ZOMBIE]
        assert not cluster.processes()
    finally:
        for agent in agents:
            with contextlib.suppress(psutil.Error):
                agent.kill()
        cluster.stop(grace_s=1.0)


@pytest.mark.ray
def test_a_cluster_whose_agent_died_or_whose_raylet_is_stopped_is_unhealthy(tmp_path: Path) -> None:
    """`ray start --block` outlives a raylet that exited because its dashboard agent died, and the GCS port still
    answers: a driver then finds no node, attempt after attempt (the chaos campaign's kill:agent). A stopped raylet
    is as useless."""
    home = tmp_path / "a-run-directory-whose-path-is-too-long-for-rays-unix-sockets" / "ray"
    cluster = LocalRayCluster(ClusterSpec(temp_dir=home, num_cpus=1))
    cluster.start()
    try:
        assert cluster.temp_dir is not None
        assert cluster.temp_dir.parent == Path(tempfile.gettempdir()), "the sockets' paths fit"
        assert (home / cluster.temp_dir.name).resolve() == cluster.temp_dir, "linked from the run's folder"
        short = cluster.temp_dir
        assert cluster.is_healthy()
        raylet = raylet_of(cluster)
        raylet.send_signal(signal.SIGSTOP)
        try:
            assert not cluster.is_healthy()
            assert cluster.dead_core_processes() == [f"raylet[{raylet.pid}]"]
        finally:
            raylet.send_signal(signal.SIGCONT)
        assert cluster.is_healthy(), "running again"

        agent = next(c for c in raylet.children() if c.name() == "ray::DashboardAgent")
        agent.suspend()
        assert cluster.dead_core_processes() == [f"ray::DashboardAgent[{agent.pid}]"]
        agent.kill()
        assert wait_for(lambda: not cluster.is_healthy(), 10)
        assert wait_for(lambda: f"raylet[{raylet.pid}]" in cluster.dead_core_processes(), 60), "it follows its agent"
    finally:
        cluster.stop(grace_s=1.0)
    # Stopped, its temp dir came home with Ray's logs, and /tmp keeps nothing of it.
    moved = home / short.name
    assert cluster.temp_dir == moved
    assert moved.is_dir()
    assert not moved.is_symlink()
    assert not short.exists()
    assert (moved / "session_latest" / "logs" / "raylet.out").is_file()
