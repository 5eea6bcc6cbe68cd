"""The embedded Ray cluster's stop ends every process it started, those without a readable marker included."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from supervisor.config import RayConfig
from supervisor.mechanisms.processes import free_ports, wait_for
from supervisor.mechanisms.ray_cluster import (
    RAY_LOG_ROTATION,
    ClusterSpec,
    LocalRayCluster,
    _move_home,
    bring_left_dirs_home,
)
from tests.multi_node import MultiNodeCluster

START_TIMEOUT_S = RayConfig().start_timeout_s


AGENT_NAMES = ("ray::DashboardAgent", "dashboard/agent.py", "ray::RuntimeEnvAgent", "runtime_env/agent/main.py")


def agents_of(raylet: psutil.Process) -> list[psutil.Process]:
    """The raylet's dashboard and runtime-env agents, by their rewritten title (Ray 2.60) or their script (2.52)."""
    return [c for c in raylet.children() if any(n in " ".join([c.name(), *c.cmdline()]) for n in AGENT_NAMES)]


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
    cluster = LocalRayCluster(
        ClusterSpec(temp_dir=tmp_path / "ray", num_cpus=1, start_timeout_s=START_TIMEOUT_S),
        on_unmarked=announced.extend,
    )
    cluster.start()
    agents: list[psutil.Process] = []
    try:
        raylet = raylet_of(cluster)
        rotation = {name: raylet.environ().get(name) for name in RAY_LOG_ROTATION}
        assert rotation == RAY_LOG_ROTATION, "Ray's logs, worker output included, rotate in the embedded cluster"

        def hidden(agent: psutil.Process) -> bool:
            return bool(cluster.marker.items() - agent.environ().items())

        assert wait_for(lambda: agents_of(raylet), 30), "the raylet started its agents"
        agents = agents_of(raylet)
        # Ray 2.60's agents rewrite their title over their environment a moment after they start (later under
        # load): no marker can be read from them, and the cluster must announce them to the reaper. Ray 2.52's
        # keep their environment readable: the marker finds them.
        wait_for(lambda: all(hidden(a) for a in agents), 15)
        cluster.processes()  # a raylet child may start after the look above (under load): the cluster looks again
        unmarked = {a.pid for a in agents if hidden(a)}
        assert unmarked <= {p.pid for p in announced}, "announced (to the reaper) once seen"
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
    cluster = LocalRayCluster(ClusterSpec(temp_dir=home, num_cpus=1, start_timeout_s=START_TIMEOUT_S))
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
            assert wait_for(lambda: cluster.dead_core_processes() == [f"raylet[{raylet.pid}]"], 10)
            assert not cluster.is_healthy()
        finally:
            raylet.send_signal(signal.SIGCONT)
        assert cluster.is_healthy(), "running again"

        agent = next(a for a in agents_of(raylet) if "Dashboard" in a.name() or "dashboard" in " ".join(a.cmdline()))
        agent.suspend()
        # SIGSTOP is delivered asynchronously: the kernel shows the agent stopped a moment later.
        stopped = [f"ray::DashboardAgent[{agent.pid}]"]
        assert wait_for(lambda: cluster.dead_core_processes() == stopped, 10), cluster.dead_core_processes()
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


@pytest.mark.ray
@pytest.mark.slow  # the multi-node cluster is the tests' own (tests/multi_node.py), not the supervisor's
def test_a_node_whose_ports_collide_joins_on_fresh_ports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CI once drew one port twice for a joining node (each was chosen while the other was already released), and
    Ray refused it. Ports are now held until all are drawn, and a node that exits before joining draws again."""
    from supervisor.mechanisms import ray_cluster

    drawn: list[list[int]] = []
    real_free_ports = ray_cluster.free_ports

    def first_draw_repeats(count: int, host: str) -> list[int]:
        ports = real_free_ports(count, host)
        if count == 6 and not drawn:
            ports = [ports[0]] * count
        drawn.append(ports)
        return ports

    cluster = MultiNodeCluster(
        ClusterSpec(temp_dir=tmp_path / "ray", num_cpus=1, dashboard=False, start_timeout_s=START_TIMEOUT_S)
    )
    cluster.start()
    try:
        monkeypatch.setattr(ray_cluster, "free_ports", first_draw_repeats)
        cluster.add_node(num_cpus=1)

        assert len(drawn) == 2
        assert len(set(drawn[1])) == 6
        node_dir = Path(f"{cluster.temp_dir}-n1")
        assert "used by other components" in (node_dir / "ray-start-1.log").read_text()
        assert "Ray runtime started" in (node_dir / "ray-start-2.log").read_text()
        assert len([p for p in cluster.processes() if p.name() == "raylet"]) == 2
        assert cluster.is_healthy()
    finally:
        cluster.stop(grace_s=1.0)
    assert not cluster.processes()


def test_ports_drawn_together_are_distinct() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64


def ray_temp_dir(short: Path) -> None:
    """What a stopped cluster leaves in its temp dir: logs, a big spilled object, a socket, Ray's session link."""
    session = short / "session_2026-11-27_01-02-03_456789_42"
    (session / "logs").mkdir(parents=True)
    (session / "logs" / "raylet.out").write_text("raylet log")
    (session / "ray_spilled_objects").mkdir()
    (session / "ray_spilled_objects" / "object").write_bytes(b"\0" * 4096)
    (short / "ray-start-1.log").write_text("Ray runtime started")
    (short / "session_latest").symlink_to(session)  # by its absolute path, as Ray makes it
    os.mknod(session / "plasma_store", stat.S_IFSOCK | 0o600)  # a socket file (bind() wants a shorter path)


def test_across_file_systems_only_the_logs_come_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short, link = tmp_path / "tmp" / "vsray-abc", tmp_path / "run" / "ray" / "vsray-abc"
    ray_temp_dir(short)
    link.parent.mkdir(parents=True)
    link.symlink_to(short)
    rename = os.rename

    def across(src, dst) -> None:
        if Path(src) == short:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", across)
    _move_home(short, link)

    assert not link.is_symlink()
    assert not short.exists()
    assert (link / "ray-start-1.log").read_text() == "Ray runtime started"
    assert (link / "session_latest" / "logs" / "raylet.out").read_text() == "raylet log", "the link is relative"
    assert sorted(p.name for p in (link / "session_latest").iterdir()) == ["logs"], "no spilled objects, no socket"


def test_a_copy_that_fails_leaves_the_dir_where_it_was_and_still_linked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    short, link = tmp_path / "tmp" / "vsray-abc", tmp_path / "run" / "ray" / "vsray-abc"
    ray_temp_dir(short)
    link.parent.mkdir(parents=True)
    link.symlink_to(short)
    monkeypatch.setattr(os, "rename", lambda src, dst: (_ for _ in ()).throw(OSError(errno.EXDEV, "cross-device")))
    copytree = shutil.copytree

    def full_disk(src, dst, *args, **kwargs) -> None:
        copytree(src, dst, *args, **kwargs)  # the copy of a folder inside comes back here, and fails too
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copytree", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _move_home(short, link)

    assert link.is_symlink()
    assert link.resolve() == short.resolve()
    assert (short / "session_latest" / "ray_spilled_objects" / "object").exists(), "nothing lost"
    assert sorted(p.name for p in link.parent.iterdir()) == ["vsray-abc"], "no half copy left"


@pytest.fixture
def left_in_tmp():
    """Makes dirs as a killed supervisor's cluster leaves them (/tmp/vsray-*); removes what is left of them."""
    made: list[Path] = []

    def make() -> Path:
        short = Path(tempfile.mkdtemp(prefix="vsray-"))
        ray_temp_dir(short)
        made.append(short)
        return short

    yield make
    for short in made:
        shutil.rmtree(short, ignore_errors=True)


def test_dirs_a_killed_supervisors_clusters_left_in_tmp_come_home_unless_in_use(tmp_path: Path, left_in_tmp) -> None:
    home = tmp_path / "run" / "ray"
    home.mkdir(parents=True)
    left, running = left_in_tmp(), left_in_tmp()
    for short in (left, running):
        (home / short.name).symlink_to(short)
    users_own = tmp_path / "elsewhere"
    users_own.mkdir()
    (home / "mine").symlink_to(users_own)
    # A cluster still running names its temp dir on its command lines (`ray start --temp-dir=...`).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", f"--temp-dir={running}"], stdin=subprocess.PIPE
    )
    try:
        moved = bring_left_dirs_home(home)
    finally:
        holder.communicate(b"")

    assert moved == [home / left.name]
    assert not left.exists()
    assert not (home / left.name).is_symlink()
    assert (home / left.name / "session_latest" / "logs" / "raylet.out").read_text() == "raylet log"
    assert (home / running.name).resolve() == running.resolve(), "in use: left where it is, linked"
    assert (home / "mine").is_symlink(), "not this module's: not touched"
    assert users_own.is_dir()


def test_a_run_directory_of_the_older_layout_gets_its_dir_home(tmp_path: Path, left_in_tmp) -> None:
    """Before each cluster had a link of its own, the run's `ray` was itself the link into /tmp."""
    short = left_in_tmp()
    home = tmp_path / "run" / "ray"
    home.parent.mkdir()
    home.symlink_to(short)

    assert bring_left_dirs_home(home) == [home / short.name]

    assert not home.is_symlink()
    assert home.is_dir()
    assert (home / short.name / "ray-start-1.log").read_text() == "Ray runtime started"
    assert not short.exists()
