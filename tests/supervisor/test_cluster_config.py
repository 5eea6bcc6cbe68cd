"""The cluster modes' configuration, resolved at the edge, and the deployment examples in scripts/cluster/."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from supervisor.cli import UsageError, compose_config, split_job_args, to_supervisor_config
from supervisor.config import SupervisorConfig, resolve_cluster
from supervisor.job.command import conflicting_args, job_argv
from supervisor.policy.restart import StartFrom
from tests.conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "scripts" / "cluster"


def _composed(overrides: tuple[str, ...]) -> SupervisorConfig:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(compose_config(["run_dir=/tmp/unused", *overrides]))


@pytest.mark.parametrize(
    ("overrides", "environ", "expected"),
    [
        (("ray.mode=address",), {"RAY_ADDRESS": "10.0.0.5:6379"}, ("10.0.0.5:6379", "http://10.0.0.5:8265", None)),
        (
            ("ray.mode=address", "ray.address=head:7000", "ray.dashboard_url=http://dash:9000"),
            {"RAY_ADDRESS": "ignored:1"},
            ("head:7000", "http://dash:9000", None),
        ),
        (("ray.mode=jobs", "ray.address=http://head:8265"), {}, ("http://head:8265", None, "head:6379")),
        (
            ("ray.mode=jobs", "ray.gcs_address=gcs:7777"),
            {"RAY_ADDRESS": "https://head.example:443"},
            ("https://head.example:443", None, "gcs:7777"),
        ),
        (("ray.mode=local",), {"RAY_ADDRESS": "10.0.0.5:6379"}, (None, None, None)),
    ],
)
def test_cluster_addresses_are_resolved_once_with_rays_default_ports(overrides, environ, expected) -> None:
    config = _composed(overrides)
    assert resolve_cluster(config, environ) == []
    assert (config.ray.address, config.ray.dashboard_url, config.ray.gcs_address) == expected


@pytest.mark.parametrize(
    ("overrides", "environ", "complaint"),
    [
        (("ray.mode=address",), {}, "ray.mode=address needs ray.address=HOST:PORT"),
        (("ray.mode=address", "ray.address=http://head:8265"), {}, "(the cluster's GCS)"),
        (("ray.mode=jobs",), {"RAY_ADDRESS": "head:6379"}, "ray.mode=jobs needs ray.address=http://HOST:8265"),
    ],
)
def test_a_cluster_mode_without_a_usable_address_is_a_usage_error(overrides, environ, complaint, monkeypatch) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    if "RAY_ADDRESS" not in environ:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UsageError, match=re.escape(complaint)):
        to_supervisor_config(compose_config(["run_dir=/tmp/unused", *overrides]))


@pytest.mark.parametrize(
    ("overrides", "listen_host"),
    [
        ((), "127.0.0.1"),
        (("ray.mode=address", "ray.address=127.0.0.1:6379"), "127.0.0.1"),
        (("ray.mode=jobs", "ray.address=http://127.0.0.1:8265"), "127.0.0.1"),
        (("ray.mode=address", "ray.address=127.0.0.1:6379", "watchdog.listen_host=0.0.0.0"), "0.0.0.0"),
    ],
)
def test_heartbeats_listen_where_the_cluster_can_reach_them(overrides, listen_host, monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = to_supervisor_config(compose_config(["run_dir=/tmp/unused", *overrides]))
    assert config.watchdog.listen_host == listen_host


# --- the deployment examples ---


def supervisor_and_job_args(command: str) -> tuple[list[str], list[str]]:
    words = shlex.split(command)
    assert words[0] == "verl-supervisor"
    return split_job_args(words[1:])


def assert_composes_against_verl(config: SupervisorConfig, job_args: list[str]) -> None:
    """The supervisor accepts the example's settings, and verl's own Hydra config accepts what it passes on."""
    import verl.trainer.main_ppo
    from hydra import compose, initialize_config_dir

    assert conflicting_args(config.job, job_args) == []
    start = StartFrom(f"{config.checkpoints.dir}/global_step_10", 10)
    argv = job_argv(config.job, job_args, Path(config.checkpoints.dir), start, "python")
    verl_config_dir = Path(verl.trainer.main_ppo.__file__).parent / "config"
    with initialize_config_dir(config_dir=str(verl_config_dir), version_base=None):
        verl_cfg = compose("ppo_trainer", overrides=argv[argv.index("verl.trainer.main_ppo") + 1 :])
    assert verl_cfg.trainer.resume_from_path == start.checkpoint


def supervisor_command(script: str, values: dict[str, str]) -> str:
    """The script's ``verl-supervisor`` command on one line, its shell variables replaced by test values."""
    command = re.search(r"^verl-supervisor .*?[^\\]$", script, re.MULTILINE | re.DOTALL).group(0)
    command = command.replace("\\\n", " ")
    for variable, value in values.items():
        command = command.replace(variable, value)
    assert "$" not in command, f"a variable the test does not know: {command}"
    return command


def test_kuberay_rayjob_example_runs_the_supervisor_on_the_cluster_it_makes(monkeypatch) -> None:
    manifest = yaml.safe_load((EXAMPLES / "kuberay-rayjob.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["backoffLimit"] == 0, "the supervisor does the restarting, not KubeRay"
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["VERL_HOOKS_SYNC_TIMEOUT_S"]

    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    mounts = [{m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]} for pod in pods]
    assert all("/mnt/shared" in m for m in mounts), "every pod sees the checkpoints"
    assert cluster["rayVersion"].startswith("2.60")

    ours, job_args = supervisor_and_job_args(spec["entrypoint"])
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")  # what the Jobs API gives an entrypoint
    config = to_supervisor_config(compose_config(ours))
    assert (config.ray.mode.value, config.ray.address) == ("address", "10.1.2.3:6379")
    assert config.ray.dashboard_url == "http://10.1.2.3:8265"
    assert config.run_dir.startswith("/mnt/shared/")
    assert config.checkpoints.dir.startswith("/mnt/shared/")
    assert_composes_against_verl(config, job_args)


def test_slurm_example_is_valid_bash_and_its_supervisor_command_composes() -> None:
    script = EXAMPLES / "slurm-verl-supervisor.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert re.search(r"^#SBATCH --nodes=\d+$", text, re.MULTILINE)
    assert "ray stop" not in text, "the allocation's end stops the Ray nodes; nothing is stopped by name"
    assert "export RAY_AUTH_MODE=token" in text, "the cluster over the allocation takes work only with its token"
    assert "RAY_AUTH_MODE=disabled" not in text

    values = {'"$ray_address"': "10.1.2.3:6379", '"$RUN_DIR"': "/shared/runs/x", '"$((expected_nodes - 1))"': "1"}
    ours, job_args = supervisor_and_job_args(supervisor_command(text, values))
    config = to_supervisor_config(compose_config(ours))
    assert (config.ray.mode.value, config.ray.address) == ("address", "10.1.2.3:6379")
    assert_composes_against_verl(config, job_args)


def test_skypilot_example_leaves_the_job_to_the_supervisor_and_its_command_composes(tmp_path: Path) -> None:
    task = yaml.safe_load((EXAMPLES / "skypilot-verl-supervisor.yaml").read_text())
    recovery = task["resources"]["job_recovery"]
    assert recovery["max_restarts_on_errors"] == 0, "a verdict of the supervisor is final; SkyPilot only replaces nodes"
    assert "recover_on_exit_codes" not in recovery
    assert "RAY_AUTH_TOKEN" in task["secrets"], "the job's Ray cluster is closed with a token SkyPilot keeps secret"
    assert task["envs"]["RAY_AUTH_MODE"] == "token"
    assert task["envs"]["RUN_DIR"].startswith("/mnt/shared/")
    assert "/mnt/shared" in task["volumes"], "every node sees the run directory and the checkpoints"

    run = tmp_path / "run.sh"
    run.write_text(task["run"])
    subprocess.run(["bash", "-n", str(run)], check=True)
    assert "ray stop" not in task["run"]
    values = {
        '"$RUN_DIR"': task["envs"]["RUN_DIR"],
        '"$SKYPILOT_NUM_NODES"': "2",
        '"$SKYPILOT_NUM_GPUS_PER_NODE"': "8",
    }
    ours, job_args = supervisor_and_job_args(supervisor_command(task["run"], values))
    config = to_supervisor_config(compose_config(ours))
    assert (config.ray.mode.value, config.ray.address) == ("address", "127.0.0.1:6379")
    assert config.metrics.port == 9464
    assert config.run_dir == task["envs"]["RUN_DIR"]
    assert_composes_against_verl(config, job_args)


@pytest.mark.parametrize(
    ("overrides", "environ", "ray_version", "refused"),
    [
        ((), {}, "2.51.1", True),  # the embedded cluster's default is token
        ((), {}, "2.52.0", False),
        ((), {}, "2.60.0", False),
        (("ray.auth_mode=disabled",), {}, "2.41.0", False),
        (("ray.mode=address", "ray.address=head:6379"), {"RAY_AUTH_MODE": "token"}, "2.48.0", True),
        (("ray.mode=address", "ray.address=head:6379"), {}, "2.48.0", False),
        (("ray.mode=jobs", "ray.address=http://head:8265", "ray.auth_mode=token"), {}, "2.47.1", True),
    ],
)
def test_token_auth_on_a_ray_that_has_none_is_refused_not_promised(overrides, environ, ray_version, refused) -> None:
    config = to_config_unresolved(overrides)
    problems = resolve_cluster(config, environ, ray_version=ray_version)
    if refused:
        (problem,) = problems
        assert problem.startswith(f"ray.auth_mode=token needs Ray 2.52 or newer; Ray {ray_version} has no token")
        assert "ray.auth_mode=disabled" in problem
    else:
        assert problems == []


def test_a_refused_token_is_a_usage_error_before_anything_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.metadata.version", lambda name: "2.50.0" if name == "ray" else "0")
    with pytest.raises(UsageError, match=r"Ray 2\.50\.0 has no token authentication"):
        to_supervisor_config(compose_config(["run_dir=/tmp/unused"]))


def to_config_unresolved(overrides: tuple[str, ...]) -> SupervisorConfig:
    from omegaconf import OmegaConf

    config = OmegaConf.to_object(compose_config(["run_dir=/tmp/unused", *overrides]))
    assert isinstance(config, SupervisorConfig)
    return config
