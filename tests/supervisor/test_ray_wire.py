"""The supervisor's own client of a Ray cluster (``ray_wire``), checked against Ray's: on a real cluster with token
authentication, the state client names the same job, actors, placement groups and nodes as ``ray.util.state``
does, the GCS calls carry the token, nothing works without it, and none of it imports Ray."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from supervisor.mechanisms import ray_wire
from supervisor.mechanisms.ray_auth import auth_env, refusal_hint
from supervisor.mechanisms.ray_cluster import LocalRayCluster
from supervisor.mechanisms.ray_kill import KillResult, kill_actors, remove_placement_groups
from supervisor.mechanisms.ray_resources import cluster_resources
from supervisor.mechanisms.ray_state import RayStateClient
from supervisor.mechanisms.ray_wire import AUTHORIZATION, StateApiError, auth_headers
from tests.conftest import REPO_ROOT, start_test_cluster, stop_test_cluster


def test_no_header_unless_the_cluster_wants_a_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc\n")
    assert auth_headers({"RAY_AUTH_TOKEN_PATH": str(token)}) == {}
    assert auth_headers({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "abc"}) == {}


def test_the_token_is_found_where_rays_loader_looks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "token"
    file.write_text("from-file\n")
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home")
    monkeypatch.setenv("HOME", str(home))
    token = {"RAY_AUTH_MODE": "token"}

    assert auth_headers({**token, "RAY_AUTH_TOKEN": "direct", "RAY_AUTH_TOKEN_PATH": str(file)}) == {
        AUTHORIZATION: "Bearer direct"
    }
    assert auth_headers({**token, "RAY_AUTH_TOKEN_PATH": str(file)}) == {AUTHORIZATION: "Bearer from-file"}
    assert auth_headers(token) == {AUTHORIZATION: "Bearer from-home"}
    pod = tmp_path / "serviceaccount-token"
    pod.write_text("from-pod")
    monkeypatch.setattr(ray_wire, "_K8S_TOKEN", pod)
    assert auth_headers({**token, "RAY_ENABLE_K8S_TOKEN_AUTH": "true"}) == {AUTHORIZATION: "Bearer from-pod"}
    file.write_text("first-line\nsecond line\n")
    assert auth_headers({**token, "RAY_AUTH_TOKEN_PATH": str(file)}) == {AUTHORIZATION: "Bearer first-line"}


def test_no_token_anywhere_no_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_headers({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}) == {}


# What the tests below compare: an attempt's driver that leaves a detached actor and a detached placement group
# behind, as a crashed verl driver leaves what it made detached.
_DRIVER = """
import json, os, ray
from ray.util.placement_group import placement_group
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, namespace="wire")

@ray.remote(num_cpus=0)
class Steady:
    def pid(self):
        return os.getpid()

actor = Steady.options(name="steady", lifetime="detached").remote()
group = placement_group([{"CPU": 1, "rollout_slot": 1}], lifetime="detached")
ray.get(group.ready())
print(json.dumps({"job_id": ray.get_runtime_context().get_job_id(), "driver_pid": os.getpid(),
                  "actor_id": actor._actor_id.hex(), "actor_pid": ray.get(actor.pid.remote()),
                  "group_id": group.id.hex()}))
"""

# Ray's own answers, from a process of their own (Ray's token loader and config are read once per process).
_REFERENCE = """
import json, os, sys
from ray.util.state import list_actors, list_jobs, list_nodes, list_placement_groups
url, job_id = sys.argv[1], sys.argv[2]
actors = list_actors(address=url, filters=[("job_id", "=", job_id), ("state", "!=", "DEAD")])
groups = list_placement_groups(address=url, filters=[("creator_job_id", "=", job_id)], detail=True)
jobs = [j for j in list_jobs(address=url) if j.job_id == job_id]
print(json.dumps({
    "actors": sorted([a.actor_id, a.class_name, a.state, a.pid, a.node_id, a.name] for a in actors),
    "groups": sorted([g.placement_group_id, g.state, g.creator_job_id, g.is_detached] for g in groups),
    "driver_pid": jobs[0].driver_info.pid,
    "nodes": sorted(n.node_id for n in list_nodes(address=url, filters=[("state", "=", "ALIVE")])),
}))
"""


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRayCluster]:
    token = tmp_path_factory.mktemp("token") / "cluster_token"
    token.write_text(secrets.token_hex(32))
    os.chmod(token, 0o600)
    cluster = start_test_cluster(num_cpus=2, dashboard=True, auth_token_path=token, resources={"rollout_slot": 2})
    try:
        yield cluster
    finally:
        report = stop_test_cluster(cluster)
        assert not report.survivors


@pytest.fixture
def with_token(token_cluster: LocalRayCluster, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The supervisor's environment on that cluster (it sets the same variables on itself)."""
    env = auth_env(token_cluster.spec.auth_mode, token_cluster.spec.auth_token_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    return {**os.environ, **env, "RAY_ADDRESS": token_cluster.address, "PYTHONPATH": str(REPO_ROOT)}


def run_python(code: str, *args: str, env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.ray
def test_the_state_client_answers_as_rays_state_api_does(token_cluster: LocalRayCluster, with_token) -> None:
    left = run_python(_DRIVER, env=with_token)
    reference = run_python(_REFERENCE, token_cluster.dashboard_url, left["job_id"], env=with_token)
    state = RayStateClient(token_cluster.dashboard_url, timeout_s=10.0)

    actors = state.live_actors(left["job_id"])
    groups = state.live_placement_groups(left["job_id"])

    assert sorted([a.actor_id, a.class_name, a.state, a.pid, a.node_id, a.name] for a in actors) == reference["actors"]
    assert [a.actor_id for a in actors] == [left["actor_id"]]
    assert (
        sorted([g.placement_group_id, g.state, g.creator_job_id, g.is_detached] for g in groups)
        == (reference["groups"])
    )
    assert [g.placement_group_id for g in groups] == [left["group_id"]]
    assert state.job_id_of_driver(left["driver_pid"]) == left["job_id"]
    assert int(reference["driver_pid"]) == left["driver_pid"]  # Ray reports it as a string
    assert state.attempt_nodes(left["job_id"]) == {actors[0].node_id: [left["actor_pid"]]}
    assert sorted(state.attempt_nodes(None)) == reference["nodes"]
    state.check()

    # The GCS calls, with the token: what the fence does to what the driver left.
    assert cluster_resources(token_cluster.address) == ({"rollout_slot": 1.0}, {"rollout_slot": 2.0})
    assert [o.result for o in kill_actors(token_cluster.address, [left["actor_id"]])] == [KillResult.KILLED]
    assert [o.result for o in remove_placement_groups(token_cluster.address, [left["group_id"]])] == [KillResult.KILLED]
    deadline = time.monotonic() + 30
    while state.live_actors(left["job_id"]) or state.live_placement_groups(left["job_id"]):
        assert time.monotonic() < deadline, "the killed actor or the removed group is still alive"
        time.sleep(0.2)
    while cluster_resources(token_cluster.address)[0] != {"rollout_slot": 2.0}:
        assert time.monotonic() < deadline, "the removed group's rollout slot never came back"
        time.sleep(0.2)


@pytest.mark.ray
@pytest.mark.parametrize(
    ("mode", "token", "status", "hint"),
    [
        ("disabled", None, 401, "the cluster wants a token; set ray.auth_mode=token"),
        ("token", "not-the-token", 403, "the cluster refused the token"),
    ],
)
def test_without_the_right_token_the_cluster_refuses_every_call_and_says_what_to_set(
    token_cluster: LocalRayCluster, monkeypatch, mode: str, token: str | None, status: int, hint: str
) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    if token:
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)  # wins over the cluster's file, as in Ray

    with pytest.raises(StateApiError) as refused:
        RayStateClient(token_cluster.dashboard_url, timeout_s=10.0).check()
    assert refused.value.status == status
    assert hint in refusal_hint(refused.value, mode)
    with pytest.raises(grpc.RpcError) as unauthenticated:
        cluster_resources(token_cluster.address)
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.ray
def test_the_supervisors_calls_to_a_cluster_do_not_import_ray(token_cluster: LocalRayCluster, with_token) -> None:
    code = """
    import json, sys
    from supervisor.mechanisms.ray_kill import kill_actors
    from supervisor.mechanisms.ray_resources import cluster_resources
    from supervisor.mechanisms.ray_state import RayStateClient
    state = RayStateClient(sys.argv[1])
    state.check(); state.live_actors(); state.live_placement_groups(); state.attempt_nodes(None)
    cluster_resources(sys.argv[2])
    kill_actors(sys.argv[2], ["ff" * 16])
    print(json.dumps(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))))
    """
    assert run_python(code, token_cluster.dashboard_url, token_cluster.address, env=with_token) == []


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"RAY_USE_TLS": "0", "RAY_TLS_CA_CERT": "/ca"}, None),
        (
            {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": "/c", "RAY_TLS_SERVER_KEY": "/k", "RAY_TLS_CA_CERT": "/ca"},
            (Path("/c"), Path("/k"), Path("/ca")),
        ),
        ({"RAY_USE_TLS": "true", "RAY_TLS_SERVER_CERT": "/c"}, "RAY_USE_TLS is set, but not RAY_TLS_SERVER_KEY"),
    ],
)
def test_the_gcs_channels_tls_is_what_rays_own_variables_say(environ: dict[str, str], expected) -> None:
    if isinstance(expected, str):
        with pytest.raises(RuntimeError, match=expected):
            ray_wire.tls_files(environ)
    else:
        assert ray_wire.tls_files(environ) == expected
