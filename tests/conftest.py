"""Shared fixtures: a private local Ray cluster per test session, and a driver connection per test module.

Every cluster a test starts has its own temp dir, ports and auth mode, and is stopped through the processes it
started (``LocalRayCluster.stop``), never with ``ray stop``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

from supervisor.config import RayConfig
from supervisor.mechanisms.processes import TerminationReport
from supervisor.mechanisms.ray_cluster import ClusterSpec, LocalRayCluster
from tests.multi_node import MultiNodeCluster

REPO_ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def loaded_script(name: str) -> Iterator[ModuleType]:
    """``scripts/<name>.py`` imported as a module (scripts are no package), for tests of its pure functions."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


def start_test_cluster(
    num_cpus: int = 16,
    dashboard: bool = False,
    extra_env: dict[str, str] | None = None,
    auth_token_path: Path | None = None,
    resources: dict[str, float] | None = None,
) -> MultiNodeCluster:
    """``extra_env`` reaches every Ray process; a ``PYTHONPATH`` in it comes before this repository. With
    ``auth_token_path``, the cluster takes work only with that file's token."""
    extra = dict(extra_env or {})
    # Some dependency installs a top-level `tests` package; workers must find this repository's first.
    extra["PYTHONPATH"] = os.pathsep.join(p for p in (extra.get("PYTHONPATH"), str(REPO_ROOT)) if p)
    cluster = MultiNodeCluster(
        ClusterSpec(
            temp_dir=Path(tempfile.mkdtemp(prefix="vst-")),
            num_cpus=num_cpus,
            resources=dict(resources or {}),
            object_store_memory_mb=512,
            start_timeout_s=RayConfig().start_timeout_s,
            dashboard=dashboard,
            extra_env=extra,
            auth_mode="token" if auth_token_path else "disabled",
            auth_token_path=str(auth_token_path) if auth_token_path else None,
        )
    )
    try:
        cluster.start()
    except BaseException:
        stop_test_cluster(cluster, grace_s=2.0)
        raise
    return cluster


def stop_test_cluster(cluster: LocalRayCluster, grace_s: float = 5.0) -> TerminationReport:
    """Stop a cluster of ``start_test_cluster`` and remove its temp dirs (its added nodes' too): /tmp keeps
    nothing of a test."""
    report = cluster.stop(grace_s=grace_s)
    folder = cluster.spec.temp_dir
    for path in [folder, *folder.parent.glob(f"{folder.name}-n*")]:
        shutil.rmtree(path, ignore_errors=True)
    return report


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[LocalRayCluster]:
    """One private cluster for the session's in-process tests (no dashboard: faster start-up)."""
    cluster = start_test_cluster()
    try:
        yield cluster
    finally:
        report = stop_test_cluster(cluster)
        assert not report.survivors, f"Ray processes survived the test cluster's teardown: {report.survivors}"
        assert not cluster.processes()


def connect_driver(cluster: LocalRayCluster, **runtime_env) -> None:
    import ray

    os.environ["RAY_AUTH_MODE"] = cluster.spec.auth_mode
    env_vars = {"PYTHONPATH": str(REPO_ROOT), **runtime_env.pop("env_vars", {})}
    ray.init(
        address=cluster.address,
        runtime_env={"env_vars": env_vars, **runtime_env},
        log_to_driver=False,
        namespace=f"test-{os.getpid()}",
    )
