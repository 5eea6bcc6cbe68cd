"""The cluster modes on a cluster with token authentication: the supervisor's calls, the child driver and the
Jobs API submission all carry the cluster's token; without it the run stops before any attempt, in one line."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.mechanisms.ray_cluster import LocalRayCluster
from tests.conftest import start_test_cluster, stop_test_cluster
from tests.supervisor.e2e.conftest import events_of, run_supervisor

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRayCluster, Path]]:
    token = tmp_path_factory.mktemp("token") / "cluster_token"
    token.write_text(secrets.token_hex(32))
    os.chmod(token, 0o600)
    cluster = start_test_cluster(num_cpus=4, dashboard=True, auth_token_path=token)
    try:
        yield cluster, token
    finally:
        report = stop_test_cluster(cluster)
        assert not report.survivors


def overrides(mode: str, cluster: LocalRayCluster) -> tuple[str, ...]:
    if mode == "address":
        return ("ray.mode=address", f"ray.address={cluster.address}", f"ray.dashboard_url={cluster.dashboard_url}")
    return ("ray.mode=jobs", f"ray.address={cluster.dashboard_url}", f"ray.gcs_address={cluster.address}")


# Both modes send the token through the same client code (ray_wire's headers, the driver's environment); the
# jobs mode's copy runs with -m slow.
@pytest.mark.parametrize("mode", ["address", pytest.param("jobs", marks=pytest.mark.slow)])
def test_a_run_on_a_token_cluster_uses_its_token_end_to_end(runs, token_cluster, mode: str) -> None:
    cluster, token = token_cluster
    run_dir = runs.new()
    auth = ("ray.auth_mode=token", f"ray.auth_token_path={token}")
    proc = run_supervisor(
        run_dir,
        "job=scripted",
        *overrides(mode, cluster),
        *auth,
        f"ray.python={sys.executable}",
        job_args=("--ping-ray",),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [e["exit_code"] for e in events_of(run_dir, "attempt_exited")] == [0]
    assert all(e["fenced"] for e in events_of(run_dir, "teardown")), "the fence asked the state API with the token"
    logs = "".join(p.read_text(errors="replace") for p in (run_dir / "attempts" / "1").glob("*.log"))
    assert "ray says pong" in logs, "the job's driver reached the cluster with the token"
    assert token.read_text() not in "".join(p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file())


@pytest.mark.parametrize("mode", ["address", "jobs"])
def test_a_supervisor_without_the_token_stops_before_any_attempt(runs, token_cluster, mode: str) -> None:
    cluster, _ = token_cluster
    run_dir = runs.new()
    proc = run_supervisor(run_dir, "job=scripted", *overrides(mode, cluster), "ray.auth_mode=disabled")
    assert proc.returncode == 6, proc.stderr[-3000:]
    assert events_of(run_dir, "attempt_started") == []
    finished = events_of(run_dir, "run_finished")[0]
    assert "the cluster wants a token; set ray.auth_mode=token" in finished["reason"]
    assert "\n" not in finished["reason"]
