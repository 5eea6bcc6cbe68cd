"""The driver launcher: guard routed into the job's actors, exit codes and error records."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from tests.conftest import REPO_ROOT
from verl_hooks.contract import ENV_CHAINED_SETUP_HOOK, read_record
from verl_hooks.errors import HookSettingsError, IncompatibleVerlError, WeightSyncFatalError
from verl_hooks.launch import exit_code_for, with_guard

JOB = "tests.verl_hooks.e2e.jobs.sync_job"


def launch(*args: str, env: dict[str, str], timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("VERL_HOOKS_", "VERL_SUPERVISOR_"))}
    full_env.update({"PYTHONPATH": str(REPO_ROOT), **env})
    return subprocess.run(
        [sys.executable, "-m", "verl_hooks.launch", *args],
        env=full_env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def result_of(proc: subprocess.CompletedProcess[str]) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result; stderr:\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


# --- routing the guard into the job's runtime_env (pure) ---


def test_guard_added_to_an_empty_runtime_env() -> None:
    env = with_guard(None, {"VERL_SUPERVISOR_ATTEMPT": "2"})
    assert env == {"worker_process_setup_hook": "verl_hooks.install", "env_vars": {"VERL_SUPERVISOR_ATTEMPT": "2"}}


def test_jobs_own_settings_are_kept_and_its_hook_chained() -> None:
    job_env = {"env_vars": {"A": "1", "VERL_SUPERVISOR_ATTEMPT": "9"}, "worker_process_setup_hook": "pkg.hook"}
    env = with_guard(job_env, {"VERL_SUPERVISOR_ATTEMPT": "2", "VERL_HOOKS_FAULTS": "abort:raise"})
    assert env["worker_process_setup_hook"] == "verl_hooks.install"
    assert env["env_vars"] == {
        "A": "1",
        "VERL_SUPERVISOR_ATTEMPT": "9",
        "VERL_HOOKS_FAULTS": "abort:raise",
        ENV_CHAINED_SETUP_HOOK: "pkg.hook",
    }
    assert job_env["worker_process_setup_hook"] == "pkg.hook", "the job's own dict is not modified"


def test_callable_hook_is_wrapped() -> None:
    def hook() -> str:
        return "ran"

    env = with_guard({"worker_process_setup_hook": hook}, {})
    wrapped = env["worker_process_setup_hook"]
    assert isinstance(wrapped, functools.partial)
    assert wrapped.args == (hook,)


def test_what_the_jobs_api_injected_is_not_added_again() -> None:
    injected = {"worker_process_setup_hook": "verl_hooks.install", "env_vars": {"VERL_SUPERVISOR_ATTEMPT": "3"}}
    env = with_guard({}, {"VERL_SUPERVISOR_ATTEMPT": "3", "VERL_HOOKS_FAULTS": "x"}, injected)
    assert env == {"env_vars": {"VERL_HOOKS_FAULTS": "x"}}


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConfigCompositionException("Could not override 'trainer.x'"), 78),
        (RuntimeError("wrapped"), 1),
        (HookSettingsError("bad"), 78),
        (IncompatibleVerlError("installed verl 9.9: update_weights is missing. Refusing to patch."), 78),
        (KeyboardInterrupt(), 130),
        (WeightSyncFatalError("x", phase="abort", global_step=1, backend="naive", elapsed_s=0.0), 75),
    ],
)
def test_exit_code_for_each_kind_of_failure(exc: BaseException, code: int) -> None:
    assert exit_code_for(exc) == code


def test_config_error_behind_other_errors_is_still_a_config_error() -> None:
    try:
        raise RuntimeError("trainer crashed") from ConfigKeyError("Key 'lr' is not in struct")
    except RuntimeError as exc:
        outer = exc
    assert exit_code_for(outer) == 78


# --- the launcher as a process ---


def test_usage_and_unknown_module_exit_2(tmp_path: Path) -> None:
    error_file = tmp_path / "error.json"
    assert launch(env={}).returncode == 2
    proc = launch("-m", "no_such_module_here", env={"VERL_SUPERVISOR_ERROR_FILE": str(error_file)})
    assert proc.returncode == 2
    assert "no module named 'no_such_module_here'" in proc.stderr
    assert read_record(error_file).error_type == "UsageError"


def test_bad_fault_spec_is_refused_before_the_job_starts(tmp_path: Path) -> None:
    error_file = tmp_path / "error.json"
    proc = launch(
        "-m",
        JOB,
        "exit3",
        env={"VERL_HOOKS_FAULTS": "update_weights:rais", "VERL_SUPERVISOR_ERROR_FILE": str(error_file)},
    )
    assert proc.returncode == 78
    assert "unknown action 'rais'" in proc.stderr
    assert read_record(error_file).error_type == "verl_hooks.errors.HookSettingsError"


def test_drivers_own_exit_code_is_kept(tmp_path: Path) -> None:
    error_file = tmp_path / "error.json"
    proc = launch("-m", JOB, "exit3", env={"VERL_SUPERVISOR_ERROR_FILE": str(error_file)})
    assert proc.returncode == 3
    record = read_record(error_file)
    assert (record.error_type, record.exit_code) == ("SystemExit", 3)


@pytest.mark.ray
def test_weight_sync_failure_in_the_task_runner_exits_75_with_its_record(ray_cluster, tmp_path: Path) -> None:
    error_file = tmp_path / "error.json"
    proc = launch(
        "-m",
        JOB,
        "sync",
        "5",
        env={
            **ray_cluster.env(),
            "VERL_HOOKS_FAULTS": "naive:raise@5#1",
            "VERL_SUPERVISOR_ATTEMPT": "1",
            "VERL_SUPERVISOR_ERROR_FILE": str(error_file),
        },
    )
    assert proc.returncode == 75, proc.stderr[-3000:]
    record = read_record(error_file)
    assert record.error_type == "verl_hooks.errors.WeightSyncFatalError"
    assert (record.phase, record.global_step, record.backend, record.hang) == ("naive", 5, "naive", False)
    assert [(o["step"], o["status"]) for o in record.cleanup] == [("wake_up", "ok")]
    assert record.exit_code == 75
    assert record.attempt == 1
    assert "InjectedFault" in record.traceback
    assert "WeightSyncFatalError" in proc.stderr
    assert "InjectedFault: injected fault naive:raise@5#1" in proc.stderr, "the original traceback is shown"
    assert "exit 75 so that a supervisor restarts it" in proc.stderr


@pytest.mark.ray
def test_next_attempt_passes_and_the_jobs_runtime_env_is_intact(ray_cluster, tmp_path: Path) -> None:
    proc = launch(
        "-m",
        JOB,
        "sync",
        "5",
        env={**ray_cluster.env(), "VERL_HOOKS_FAULTS": "naive:raise@5#1", "VERL_SUPERVISOR_ATTEMPT": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = result_of(proc)
    assert result["guarded"] is True, "the setup hook installed the guard in the TaskRunner actor"
    assert result["own_env"] == "kept"
    assert result["own_hook_ran"] == "1", "the job's own setup hook still runs"
    assert result["attempt"] == "2"
    assert result["replicas"] == [{"generation": "running", "kv_cache": "present", "awake": True, "weight_version": 5}]


@pytest.mark.ray
def test_other_failures_keep_a_code_of_their_own(ray_cluster, tmp_path: Path) -> None:
    error_file = tmp_path / "error.json"
    proc = launch("-m", JOB, "fail", env={**ray_cluster.env(), "VERL_SUPERVISOR_ERROR_FILE": str(error_file)})
    assert proc.returncode == 1
    record = read_record(error_file)
    assert record.error_type == "ValueError"
    assert "the trainer failed for a reason of its own" in record.message
    assert record.phase is None


@pytest.mark.ray
def test_trainer_ended_by_the_guards_backstop_still_exits_75(ray_cluster, tmp_path: Path) -> None:
    """The driver only sees its TaskRunner die; the backstop's record says why, and the exit code follows it."""
    error_file = tmp_path / "error.json"
    proc = launch("-m", JOB, "backstop", "7", env={**ray_cluster.env(), "VERL_SUPERVISOR_ERROR_FILE": str(error_file)})
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "ActorDiedError" in proc.stderr
    assert "weight-sync failure in phase 'build_process_group' at global step 7" in proc.stderr
    record = read_record(error_file)
    assert (record.source, record.phase, record.global_step, record.hang) == (
        "guard-backstop",
        "build_process_group",
        7,
        True,
    )


@pytest.mark.ray
def test_exit_fault_kills_the_process_of_the_phase(ray_cluster, tmp_path: Path) -> None:
    error_file = tmp_path / "error.json"
    proc = launch(
        "-m",
        JOB,
        "sync",
        "5",
        env={
            **ray_cluster.env(),
            "VERL_HOOKS_FAULTS": "naive:exit@5#1",
            "VERL_SUPERVISOR_ERROR_FILE": str(error_file),
            "VERL_HOOKS_FAULT_LOG": str(tmp_path / "faults.jsonl"),
        },
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    record = read_record(error_file)
    assert record.error_type.endswith("ActorDiedError"), "the TaskRunner died: no weight-sync error could be raised"
    (fired,) = [json.loads(line) for line in (tmp_path / "faults.jsonl").read_text().splitlines()]
    assert (fired["spec"], fired["step"]) == ("naive:exit@5#1", 5)
    assert not psutil.pid_exists(fired["pid"]), "the process the phase ran in (the TaskRunner) is gone"
