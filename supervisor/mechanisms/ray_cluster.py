"""A local Ray cluster owned by one process: its own temp dir, ports, loopback address and auth mode.

On a shared machine a plain ``ray.init()`` may join someone else's cluster, Ray's default ports collide with
other clusters (the dashboard agent's 52365 above all), and ``ray stop`` kills every cluster of every user.
So the cluster is ``ray start --head --block`` as a child of its owner, every port chosen explicitly, and it is
stopped by signalling exactly the processes that carry its marker.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import psutil

from supervisor.mechanisms.marked import find_marked_processes
from supervisor.mechanisms.processes import (
    REAP_TIMEOUT_S,
    ChildProcess,
    TerminationReport,
    free_ports,
    merge_reports,
    port_open,
    start_child,
    tail,
    terminate_processes,
    wait_for,
    with_descendants,
)
from supervisor.mechanisms.ray_auth import auth_env
from verl_hooks.contract import ENV_CLUSTER_ID

logger = logging.getLogger(__name__)

RAY_LOG_ROTATION = {"RAY_ROTATION_MAX_BYTES": str(64 * 1024 * 1024), "RAY_ROTATION_BACKUP_COUNT": "2"}
"""The embedded cluster's logs: each file rotated at 64 MB, 2 backups kept (at most 192 MB a file)."""

ABANDONED_START_GRACE_S = 5.0
"""For the processes of a start that failed (a port taken): they run no job and hold nothing worth a longer
grace before SIGKILL."""

# Ray puts unix sockets under the temp dir ("<temp>/session_<date>_<pid>/sockets/plasma_store"), and a socket
# path may not exceed 107 bytes: a longer temp dir is replaced by a short one under /tmp.
_MAX_TEMP_DIR_LEN = 40


class ClusterStartError(RuntimeError):
    """The local Ray cluster did not come up."""


@dataclass(frozen=True)
class ClusterSpec:
    temp_dir: Path
    start_timeout_s: float
    """``ray.start_timeout_s``: how long one ``ray start`` may take to answer."""
    num_cpus: int | None = None
    num_gpus: int | None = None
    """Logical GPUs of the head node, as ``ray start --num-gpus`` (None: Ray counts the machine's)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom logical resources of the head node, as ``ray start --resources``."""
    object_store_memory_mb: int | None = None
    node_ip: str = "127.0.0.1"
    dashboard: bool = True
    auth_mode: str = "disabled"
    auth_token_path: str | None = None
    """The token file of ``auth_mode=token`` (its path reaches every process; the token never leaves it)."""
    start_attempts: int = 3
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterPorts:
    gcs: int
    dashboard: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    metrics_export: int
    runtime_env_agent: int
    client_server: int
    dashboard_metrics: int
    """The dashboard's Prometheus endpoint (Ray's fixed default, 44227, would collide on a shared machine)."""
    autoscaler_metrics: int
    """The autoscaler monitor's Prometheus endpoint (default 44217)."""

    @classmethod
    def pick(cls, host: str) -> ClusterPorts:
        return cls(*free_ports(len(fields(cls)), host))


def _move_home(short: Path, link: Path) -> None:
    """``short`` in place of ``link`` (a link to it). On one file system, renamed whole. Across file systems only
    what is worth keeping is copied (the top level's files and each session's logs; not spilled objects, runtime
    environments' downloads or sockets, which can be large or mean nothing once the cluster is down), into a
    folder that takes the link's place once complete. Raises OSError with the link still in place."""
    try:
        link.unlink()
        os.rename(short, link)
    except OSError:
        if not link.is_symlink():
            link.symlink_to(short, target_is_directory=True)
        copying = link.with_name(f"{link.name}.moving")
        try:
            shutil.copytree(short, copying, symlinks=True, ignore=_not_kept)
            link.unlink()
            os.rename(copying, link)
        except (OSError, shutil.Error) as exc:
            shutil.rmtree(copying, ignore_errors=True)
            if not link.is_symlink():
                link.symlink_to(short, target_is_directory=True)
            raise OSError(f"copying it failed: {exc}") from exc
        shutil.rmtree(short, ignore_errors=True)
    latest = link / "session_latest"  # Ray's link to the session, by its absolute path
    if latest.is_symlink():
        session = Path(os.readlink(latest)).name
        latest.unlink()
        latest.symlink_to(session, target_is_directory=True)


def bring_left_dirs_home(home: Path) -> list[Path]:
    """Temp dirs that a cluster no one stopped left under /tmp, moved into ``home`` (where they are linked from);
    the folders they are now.

    A supervisor that was SIGKILLed cannot move its cluster's dir home; the next one on the run does it. A run
    directory of an older version is itself the link (``home`` -> /tmp/vsray-*): it becomes a folder holding that
    link first. Only this module's own dirs (/tmp/vsray-*) are touched, and none that a live process names on its
    command line (a cluster still running)."""
    if home.is_symlink():
        target = Path(os.readlink(home))
        if not _ours(target):
            return []
        home.unlink()
        home.mkdir(parents=True)
        (home / target.name).symlink_to(target, target_is_directory=True)
    if not home.is_dir():
        return []
    left = {
        link: Path(os.readlink(link)) for link in home.iterdir() if link.is_symlink() and _ours(Path(os.readlink(link)))
    }
    left = {link: short for link, short in left.items() if short.is_dir()}
    if not left:
        return []
    in_use = _named_by_live_processes(list(left.values()))
    moved = []
    for link, short in left.items():
        if short in in_use:
            continue
        try:
            _move_home(short, link)
        except OSError as exc:
            logger.warning("Ray's temp dir %s stays there, linked from %s: %s", short, link, exc)
            continue
        logger.info("Ray's temp dir %s, left by a cluster no one stopped, moved to %s", short, link)
        moved.append(link)
    return moved


def _ours(path: Path) -> bool:
    return path.is_absolute() and path.parent == Path(tempfile.gettempdir()) and path.name.startswith("vsray-")


def _named_by_live_processes(dirs: list[Path]) -> set[Path]:
    found: set[Path] = set()
    for process in psutil.process_iter():
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        found.update(d for d in dirs if str(d) in command)
    return found


def _not_kept(folder: str, names: list[str]) -> list[str]:
    """What a copy across file systems leaves behind: sockets, and in a session folder everything but logs."""
    in_session = Path(folder).name.startswith("session_")
    return [
        name
        for name in names
        if stat.S_ISSOCK(os.lstat(os.path.join(folder, name)).st_mode) or (in_session and name != "logs")
    ]


_NOT_RUNNING = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD, psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)


def _core_name(process: psutil.Process) -> str | None:
    """The name of a core process of a cluster (GCS, raylet, its agents, dashboard), else None (raises
    psutil.Error). A stopped runtime-env agent leaves every new worker waiting for its environment."""
    name = process.name()
    if name in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"):
        return name
    # Before their title is rewritten (Ray 2.52's agents keep theirs), the agents are known by their script.
    for script, core in _CORE_SCRIPTS:
        if any(part.endswith(script) for part in process.cmdline()):
            return core
    return None


_CORE_SCRIPTS = (
    ("dashboard/dashboard.py", "dashboard"),
    ("dashboard/agent.py", "ray::DashboardAgent"),
    ("runtime_env/agent/main.py", "ray::RuntimeEnvAgent"),
)


class LocalRayCluster:
    def __init__(
        self,
        spec: ClusterSpec,
        cluster_id: str | None = None,
        on_unmarked: Callable[[list[psutil.Process]], None] | None = None,
    ) -> None:
        """``on_unmarked`` is told of each process of the cluster that carries no readable marker, once."""
        self.spec = spec
        self.cluster_id = cluster_id or uuid.uuid4().hex[:12]
        self.ports: ClusterPorts | None = None
        self.temp_dir: Path | None = None
        self._process: ChildProcess | None = None
        self._log_path: Path | None = None
        self._seen: dict[int, psutil.Process] = {}
        self._on_unmarked = on_unmarked
        self._core: list[tuple[psutil.Process, str]] = []
        self._away: list[tuple[Path, Path]] = []
        """Temp dirs under /tmp (a long ``spec.temp_dir``), each with the link in ``spec.temp_dir`` that it
        replaces once the cluster is stopped."""

    @property
    def address(self) -> str:
        """The GCS address a job's driver connects to (``RAY_ADDRESS``)."""
        if self.ports is None:
            raise RuntimeError("cluster not started")
        return f"{self.spec.node_ip}:{self.ports.gcs}"

    @property
    def dashboard_url(self) -> str:
        if self.ports is None:
            raise RuntimeError("cluster not started")
        return f"http://127.0.0.1:{self.ports.dashboard}"

    @property
    def marker(self) -> dict[str, str]:
        """The environment marker every process of this cluster (Ray workers included) inherits."""
        return {ENV_CLUSTER_ID: self.cluster_id}

    def env(self) -> dict[str, str]:
        """Variables a client of this cluster needs (the job's driver gets these)."""
        return {"RAY_ADDRESS": self.address, **auth_env(self.spec.auth_mode, self.spec.auth_token_path)}

    def start(self) -> None:
        self.temp_dir = self._resolve_temp_dir()
        errors = []
        for attempt in range(1, self.spec.start_attempts + 1):
            try:
                self._start_once(attempt)
                return
            except ClusterStartError as exc:
                # Most often a port taken between choosing it and binding it: choose again.
                errors.append(str(exc))
                self._stop_processes(ABANDONED_START_GRACE_S, REAP_TIMEOUT_S)
        self._bring_temp_dirs_home()  # what `ray start` said is in there
        raise ClusterStartError(
            f"local Ray cluster did not start after {self.spec.start_attempts} attempts:\n" + "\n---\n".join(errors)
        )

    def _resolve_temp_dir(self) -> Path:
        bring_left_dirs_home(self.spec.temp_dir)
        wanted = self.spec.temp_dir.resolve()
        if len(str(wanted)) <= _MAX_TEMP_DIR_LEN:
            wanted.mkdir(parents=True, exist_ok=True)
            return wanted
        return self._short_dir(Path(tempfile.mkdtemp(prefix="vsray-")))

    def _short_dir(self, short: Path) -> Path:
        """``short`` (under /tmp) as a temp dir of this cluster, reached through a link in ``spec.temp_dir``
        while the cluster runs, and moved there, with Ray's logs, when it stops."""
        home = self.spec.temp_dir.resolve()
        home.mkdir(parents=True, exist_ok=True)
        link = home / short.name
        link.symlink_to(short, target_is_directory=True)
        self._away.append((short, link))
        logger.info("Ray temp dir %s is too long for unix sockets; using %s (linked from it)", home, short)
        return short

    def _start_once(self, attempt: int) -> None:
        assert self.temp_dir is not None
        self.ports = ClusterPorts.pick(self.spec.node_ip)
        self._log_path = self.temp_dir / f"ray-start-{attempt}.log"
        env = self._env()
        log = self._log_path.open("wb")
        try:
            self._process = start_child(self._command(), env=env, stdout=log, stderr=log)
        finally:
            log.close()

        def ready() -> bool:
            if self._process is not None and self._process.poll() is not None:
                return True
            started = "Ray runtime started" in tail(self._log_path, 65536)
            return started and port_open(self.spec.node_ip, self.ports.gcs) and self._dashboard_ready()

        ok = wait_for(ready, self.spec.start_timeout_s)
        status = self._process.poll()
        if status is not None or not ok:
            what = f"`ray start` ended ({status.describe()})" if status else "timed out"
            raise ClusterStartError(f"{what}; its output ends with:\n{tail(self._log_path, 4000)}")
        self._core = []
        self._remember_core()  # its agents and core processes are known from now on, whatever dies first
        logger.info("local Ray cluster %s up at %s (dashboard %s)", self.cluster_id, self.address, self.dashboard_url)

    def _dashboard_ready(self) -> bool:
        return not self.spec.dashboard or port_open("127.0.0.1", self.ports.dashboard)

    def _env(self) -> dict[str, str]:
        env = {
            **os.environ,
            **self.spec.extra_env,
            **self.marker,
            **auth_env(self.spec.auth_mode, self.spec.auth_token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            # The dashboard serves a worker's stacks (py-spy on its node) only when profiling is on (off by default
            # since Ray 2.5x for security): a stall's stacks need it. The dashboard is on loopback and, by default,
            # behind the cluster's token.
            "RAY_DASHBOARD_ENABLE_PROFILING": "1",
        }
        env.pop("RAY_ADDRESS", None)  # never let `ray start` look for another cluster
        # Ray keeps 5 backups of 512 MB per log file by default (ray/_common/ray_constants.py) and rotates a
        # worker's stdout and stderr only when RAY_ROTATION_MAX_BYTES is set (_private/workers/default_worker.py):
        # a week of a verl job's output would fill the run directory. The user's own setting wins.
        for name, value in RAY_LOG_ROTATION.items():
            env.setdefault(name, value)
        # The dashboard agent runs the py-spy found on PATH: the one installed with this interpreter's Ray comes
        # first (a virtual environment's bin is not on PATH unless it was activated).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if self.ports is not None:
            # Ray reads these two from the environment only (dashboard/consts.py, autoscaler/_private/constants.py)
            # and binds them to every interface: read-only metrics, but on ports of this cluster's own.
            env["DASHBOARD_METRIC_PORT"] = str(self.ports.dashboard_metrics)
            env["AUTOSCALER_METRIC_PORT"] = str(self.ports.autoscaler_metrics)
        return env

    def _ray_start(
        self,
        temp_dir: Path,
        num_cpus: int | None,
        options: list[str],
        num_gpus: int | None = None,
        resources: dict[str, float] | None = None,
    ) -> list[str]:
        """The one `ray start` command line: the options every node has, then ``options`` (head or worker)."""
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--block",
            "--disable-usage-stats",
            f"--node-ip-address={self.spec.node_ip}",
            f"--temp-dir={temp_dir}",
            *options,
        ]
        if num_cpus is not None:
            command.append(f"--num-cpus={num_cpus}")
        if num_gpus is not None:
            command.append(f"--num-gpus={num_gpus}")
        if resources:
            command.append(f"--resources={json.dumps(resources)}")
        if self.spec.object_store_memory_mb is not None:
            command.append(f"--object-store-memory={self.spec.object_store_memory_mb << 20}")
        return command

    def _command(self) -> list[str]:
        assert self.ports is not None
        assert self.temp_dir is not None
        ports = self.ports
        return self._ray_start(
            self.temp_dir,
            self.spec.num_cpus,
            [
                "--head",
                f"--port={ports.gcs}",
                f"--include-dashboard={'true' if self.spec.dashboard else 'false'}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={ports.dashboard}",
                f"--dashboard-agent-listen-port={ports.dashboard_agent_listen}",
                f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}",
                f"--metrics-export-port={ports.metrics_export}",
                f"--runtime-env-agent-port={ports.runtime_env_agent}",
                f"--ray-client-server-port={ports.client_server}",
            ],
            num_gpus=self.spec.num_gpus,
            resources=self.spec.resources,
        )

    def is_healthy(self) -> bool:
        """`ray start --block` runs, the GCS answers, and its core processes (GCS, raylets and their agents,
        dashboard) run.

        `ray start --block` does not notice every death: with its dashboard agent killed a raylet exits, and a
        driver then finds no node to connect to, attempt after attempt. A core process that is stopped
        (SIGSTOP) leaves the cluster as useless as a dead one."""
        if self._process is None or self._process.poll() is not None or self.ports is None:
            return False
        return port_open(self.spec.node_ip, self.ports.gcs) and not self.dead_core_processes()

    def dead_core_processes(self) -> list[str]:
        """Those of the GCS, the raylets, their agents and the dashboard that are gone or stopped, as
        ``name[pid]``."""
        dead = []
        for process, name in self._core:
            try:
                if process.is_running() and process.status() not in _NOT_RUNNING:
                    continue
            except psutil.Error:
                pass
            dead.append(f"{name}[{process.pid}]")
        return dead

    def _remember_core(self) -> None:
        known = {process.pid for process, _ in self._core}
        for process in self.processes():
            try:
                name = _core_name(process)
            except psutil.Error:
                continue
            if name and process.pid not in known:
                self._core.append((process, name))

    def processes(self) -> list[psutil.Process]:
        """Its marked processes, their descendants, and every one of those seen before and still running.

        Ray's agents, children of the raylet, carry no readable marker (their title rewrite clobbers their
        environment); when `ray start --block` sees a process of the cluster die it kills the raylet, and the
        orphaned agents are no one's descendants any more: they are remembered from an earlier look."""
        marked = find_marked_processes(self.marker)
        found = {p.pid: p for p in with_descendants(marked)}
        unmarked = [p for pid, p in found.items() if pid not in self._seen and pid not in {m.pid for m in marked}]
        if unmarked and self._on_unmarked is not None:
            self._on_unmarked(unmarked)
        for pid, process in list(self._seen.items()):
            if pid in found:
                continue
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    found[pid] = process
                    continue
            except psutil.Error:
                pass
            del self._seen[pid]
        self._seen.update(found)
        return list(found.values())

    def stop(self, grace_s: float, reap_timeout_s: float = REAP_TIMEOUT_S) -> TerminationReport:
        """Stop every process of this cluster (and only those), and reap the `ray start` children.

        SIGTERM to `ray start --block` alone brings the cluster down in a second or two (Ray's own fate
        sharing); SIGTERM to every process at once makes the raylet and GCS linger. So only the `ray start`
        processes are signalled, and the one escalation gives the cluster's other processes ``grace_s`` to
        follow before SIGKILL; processes that appear during the shutdown get the same. Then a temp dir that had
        to live under /tmp is moved into ``spec.temp_dir``, Ray's logs with it.
        """
        report = self._stop_processes(grace_s, reap_timeout_s)
        self._bring_temp_dirs_home()
        return report

    def _stop_processes(self, grace_s: float, reap_timeout_s: float) -> TerminationReport:
        marked = self.processes()
        ray_starts = [self._process] if self._process is not None else []
        for node in ray_starts:
            if node.poll() is None:
                os.kill(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        reports = [terminate_processes(marked, grace_s, {p.pid for p in marked}, reap_timeout_s)]
        late = self.processes()
        if late:  # started during the shutdown: what is left of the same grace, not a second one
            reports.append(terminate_processes(late, max(0.0, deadline - time.monotonic()), (), reap_timeout_s))
        for node in ray_starts:
            node.wait(timeout_s=reap_timeout_s)
        self._process = None
        report = merge_reports(*reports)
        if report.survivors:
            logger.error("processes of Ray cluster %s survived SIGKILL: %s", self.cluster_id, report.survivors)
        return report

    def _bring_temp_dirs_home(self) -> None:
        """Each temp dir under /tmp replaces its link in ``spec.temp_dir`` (``temp_dir`` then names where it is
        now): the run keeps Ray's logs, and /tmp keeps nothing of it. A dir that cannot be moved stays where it
        is, still linked."""
        while self._away:
            short, link = self._away.pop()
            try:
                _move_home(short, link)
            except OSError as exc:
                logger.warning("Ray's temp dir %s stays there, linked from %s: %s", short, link, exc)
                continue
            if self.temp_dir == short:
                self.temp_dir = link
