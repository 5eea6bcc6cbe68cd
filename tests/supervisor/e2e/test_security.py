"""Nobody else gets into a supervised run: the embedded cluster wants the run's token, the run's files are the
user's alone, and no secret of the job's environment lands in the run directory."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from supervisor.mechanisms.marked import find_marked_processes
from tests.supervisor.e2e.conftest import events_of, start_supervisor, state_of, wait_until
from verl_hooks.contract import ENV_RUN_ID

pytestmark = pytest.mark.ray

SECRET = "s3cr3t-value-of-the-jobs-env-7731"
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
# Ray 2.60 binds these to every interface whatever the flags (the GCS, the raylet's node and object managers, the
# Ray Client server, which `ray start --head` always starts when grpcio is installed); each checks the token on
# every call once RAY_AUTH_MODE=token (ray/_private/grpc_utils.py, create_grpc_server_with_interceptors).
# The agents rewrite their process title a moment after they start (ray::DashboardAgent, ray::RuntimeEnvAgent):
# either name may be read.
TOKEN_CHECKED = (
    "gcs_server",
    "raylet",
    "ray.util.client.server",
    "dashboard/agent.py",
    "ray::DashboardAgent",
    "runtime_env/agent/main.py",
    "ray::RuntimeEnvAgent",
)
# Read-only Prometheus endpoints Ray binds to every interface (dashboard/head.py, autoscaler/_private/monitor.py);
# the supervisor gives them ports of the cluster's own through these variables.
METRICS_PORT_VARIABLES = ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")


def outsider_env(home: Path, **extra: str) -> dict[str, str]:
    """Another user's shell on this machine: none of the run's variables, no token in ~/.ray."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VERL_"))}
    return {**env, "HOME": str(home), **extra}


def run_as_outsider(argv: list[str], home: Path, **extra: str) -> tuple[int | None, str]:
    """Exit code and output; None when it kept trying past 30 s without getting in (a driver without auth
    retries the GCS connection the cluster keeps refusing)."""
    try:
        done = subprocess.run(argv, env=outsider_env(home, **extra), capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as timed_out:
        output = timed_out.stdout or b""
        return None, output.decode() if isinstance(output, bytes) else output
    return done.returncode, done.stdout


def listeners(pids: set[int]) -> tuple[list[tuple[str, int, str]], set[int]]:
    """(address, port, process command line) of every listening TCP socket of these processes, and the metrics
    ports their environments name."""
    found, metrics_ports = [], set()
    for pid in pids:
        try:
            process = psutil.Process(pid)
            cmdline = " ".join(process.cmdline()) or process.name()
            sockets = process.net_connections(kind="inet")
            environ = process.environ()
        except psutil.NoSuchProcess:
            continue
        found += [(s.laddr.ip, s.laddr.port, cmdline) for s in sockets if s.status == psutil.CONN_LISTEN]
        metrics_ports |= {int(environ[name]) for name in METRICS_PORT_VARIABLES if name in environ}
    return found, metrics_ports


def test_the_embedded_cluster_refuses_clients_without_the_runs_token(runs, tmp_path: Path) -> None:
    run_dir = runs.new()
    supervisor = start_supervisor(
        run_dir,
        "job=scripted",
        f"+job.env.MY_API_TOKEN={SECRET}",
        job_args=("--until-file", str(tmp_path / "done-looking")),
    )
    try:
        wait_until((run_dir / "attempts" / "1" / "ready").exists, 120, "attempt 1 to run")
        cluster = events_of(run_dir, "cluster_started")[0]
        address, dashboard = cluster["address"], cluster["dashboard"]
        home = tmp_path / "outsider"
        home.mkdir()

        driver = f"import ray; ray.init(address='{address}'); print('CONNECTED')"
        for mode in ("token", "disabled"):
            code, output = run_as_outsider([sys.executable, "-c", driver], home, RAY_AUTH_MODE=mode)
            assert code != 0, f"a driver without the token got in (RAY_AUTH_MODE={mode})"
            assert "CONNECTED" not in output
        code, output = run_as_outsider(
            [sys.executable, "-m", "ray.scripts.scripts", "status", f"--address={address}"], home
        )
        assert code != 0, output
        submit = urllib.request.Request(
            f"{dashboard}/api/jobs/",
            data=json.dumps({"entrypoint": "echo pwned"}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as refused_job:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(submit, timeout=10)
        assert refused_job.value.code == 401

        run_id = state_of(run_dir)["run_id"]
        pids = {p.pid for p in find_marked_processes({ENV_RUN_ID: run_id})} | {supervisor.pid}
        found, metrics_ports = listeners(pids)
        assert len(metrics_ports) == 2, "the metrics endpoints get ports of the cluster's own"
        open_ones = [
            (ip, port, cmd)
            for ip, port, cmd in found
            if ip not in LOOPBACK and port not in metrics_ports and not any(name in cmd for name in TOKEN_CHECKED)
        ]
        assert open_ones == [], "listening beyond loopback without a token check"
    finally:
        (tmp_path / "done-looking").touch()
        supervisor.wait(timeout=300)
    assert supervisor.returncode == 0, (run_dir.parent / f"{run_dir.name}.supervisor.log").read_text()[-3000:]

    assert stat.S_IMODE((run_dir / "ray_auth_token").stat().st_mode) == 0o600
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    for name in ("state.json", "events.jsonl", "supervisor.lock"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) & 0o077 == 0, name
    token = (run_dir / "ray_auth_token").read_text()
    for folder, _, files in os.walk(run_dir, followlinks=True):
        for name in files:
            path = Path(folder) / name
            if name == "ray_auth_token" or not path.is_file():
                continue
            data = path.read_bytes()
            assert SECRET.encode() not in data, f"the job's secret is in {path}"
            assert token.encode() not in data, f"the cluster's token is in {path}"
