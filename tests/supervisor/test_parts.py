"""Configuration, history, run directory, events, job command and report: no processes, no Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from supervisor.cli import UsageError, compose_config, split_job_args, to_supervisor_config
from supervisor.config import JobConfig, SupervisorConfig, ordered_rules
from supervisor.job.command import conflicting_args, job_argv
from supervisor.outcomes import Action
from supervisor.policy.restart import StartFrom
from supervisor.run.events import AttemptStarted, Event, EventLog, RunFinished, read_events
from supervisor.run.history import AttemptRecord, IllegalTransition, RunHistory, RunState
from supervisor.run.rundir import RunDirectory, RunDirectoryInUse
from supervisor.run.table import attempts_table
from tests.conftest import REPO_ROOT

# --- configuration ---


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        (["restart.max_restart=3"], "Key 'max_restart' not in 'RestartConfig'"),
        (["restart.max_restarts=many"], "max_restarts"),
        (["restart.max_restarts=-1"], "restart.max_restarts must be >= 0"),
        (["job=nope"], "Could not find 'job/nope'"),
        (["ray.mode=cloud"], "ray.mode"),
        (["ray.auth_mode=maybe"], "Invalid value 'maybe', expected one of [disabled, token]"),
        (["teardown.fence_timeout_s=0"], "teardown.fence_timeout_s must be > 0"),
        (["rules.0.log_regex='(unclosed'"], "is not a valid regex"),
        (["+restart.bogus=1"], "Key 'bogus' not in 'RestartConfig'"),
        (["+watchdog.tick=1"], "Key 'tick' not in 'WatchdogConfig'"),
        (["teardown.reap_timeout_s=-1"], "teardown.reap_timeout_s must be >= 0"),
        (["preemption.poll_s=0"], "preemption.poll_s must be > 0"),
        (["preemption.margin_s=-5"], "preemption.margin_s must be >= 0"),
        (["rules.2.name=preempted"], "the name 'preempted' is the supervisor's own verdict"),
        (
            ["rules.0.name=interrupted"],
            "rules[0] (interrupted): the name 'interrupted' is the supervisor's own verdict",
        ),
        (["rules.1.name=resume-mismatch"], "the name 'resume-mismatch' is the supervisor's own verdict"),
        # As a new user writes it: a misspelled phase would never match, so it is refused.
        (
            ["rules=[{name: x, action: restart, phases: [update_weigths]}]"],
            "rules[0] (x).phases: 'update_weigths' is not a weight-sync phase",
        ),
        (["extra_rules=[{name: x, action: fail, phases: [abort, nope]}]"], "extra_rules[0] (x).phases: 'nope'"),
        (["extra_rules=[{name: success, action: fail, exit_codes: [3]}]"], "another rule has the name 'success'"),
    ],
)
def test_config_errors_are_one_line_usage_errors(overrides: list[str], complaint: str) -> None:
    with pytest.raises(UsageError) as error:
        to_supervisor_config(compose_config(["run_dir=/tmp/unused", *overrides]))
    message = str(error.value)
    assert complaint in message
    assert "\n" not in message


def test_default_config_is_the_mini_ppo_job_on_an_embedded_cluster(tmp_path: Path) -> None:
    config = to_supervisor_config(compose_config([f"run_dir={tmp_path}/run"]))
    assert config.job.name == "mini_ppo"
    assert config.job.argv[2:] == ["verl_hooks.launch", "-m", "mini_ppo.main"]
    assert config.ray.mode.value == "local"
    assert config.checkpoints.dir == f"{tmp_path}/run/checkpoints"
    assert [rule.name for rule in config.rules][:3] == ["stalled", "success", "weight-sync-failure"]


def test_user_presets_come_from_config_dir(tmp_path: Path) -> None:
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "mine.yaml").write_text(
        "# @package _global_\njob:\n  name: mine\n  argv: [my-trainer]\n  checkpoint_dir_arg: null\n"
        "restart:\n  max_restarts: 7\nteardown:\n  grace_s: 30\nray:\n  dashboard: false\n"
    )
    config = to_supervisor_config(compose_config(["run_dir=/tmp/unused", "job=mine"], config_dir=tmp_path))
    assert (config.job.name, config.job.argv) == ("mine", ["my-trainer"])
    # A preset's settings of the supervisor hold: conf/supervisor.yaml, composed after it, repeats no default.
    assert (config.restart.max_restarts, config.teardown.grace_s, config.ray.dashboard) == (7, 30, False)


def test_a_presets_own_rules_are_refused_with_where_rules_go(tmp_path: Path) -> None:
    """conf/supervisor.yaml's `rules:`, composed last, would replace the preset's without a word."""
    (tmp_path / "job").mkdir()
    preset = (
        "# @package _global_\njob:\n  name: mine\n  argv: [my-trainer]\n"
        "{key}:\n  - {{name: mine, action: fail, exit_codes: [3]}}\n"
    )
    for header in ("", "\n", "  "):  # Hydra reads a header after blank lines and indented too
        (tmp_path / "job" / "mine.yaml").write_text(header + preset.format(key="rules"))
        with pytest.raises(UsageError, match=r"mine.yaml sets rules, which supervisor.yaml sets too.*extra_rules"):
            compose_config(["run_dir=/tmp/unused", "job=mine"], config_dir=tmp_path)

    (tmp_path / "job" / "mine.yaml").write_text(preset.format(key="extra_rules"))
    config = to_supervisor_config(compose_config(["run_dir=/tmp/unused", "job=mine"], config_dir=tmp_path))
    assert [rule.name for rule in ordered_rules(config)][:3] == ["mine", "stalled", "success"]


def test_extra_rules_on_the_command_line_keep_the_built_in_ones() -> None:
    config = to_supervisor_config(
        compose_config(["run_dir=/tmp/unused", "extra_rules=[{name: x, action: fail, exit_codes: [3]}]"])
    )
    names = [rule.name for rule in ordered_rules(config)]
    assert names[0] == "x"
    assert names[1:] == [rule.name for rule in config.rules]
    assert "success" in names


def test_verl_ppo_preset_composes_against_verls_own_config(tmp_path: Path) -> None:
    """Every override the preset and the supervisor give verl's main_ppo must be accepted by verl's Hydra config."""
    import verl.trainer.main_ppo

    config = to_supervisor_config(compose_config([f"run_dir={tmp_path}", "job=verl_ppo"]))
    start = StartFrom(str(tmp_path / "checkpoints" / "global_step_4"), 4)
    argv = job_argv(config.job, ["trainer.total_training_steps=10"], Path(config.checkpoints.dir), start, "python")
    verl_overrides = argv[argv.index("verl.trainer.main_ppo") + 1 :]
    verl_config_dir = Path(verl.trainer.main_ppo.__file__).parent / "config"
    with initialize_config_dir(config_dir=str(verl_config_dir), version_base=None):
        verl_cfg = compose("ppo_trainer", overrides=verl_overrides)
    assert verl_cfg.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook == "verl_hooks.install"
    assert verl_cfg.trainer.resume_mode == "resume_path"
    assert verl_cfg.trainer.resume_from_path == start.checkpoint
    assert verl_cfg.trainer.default_local_dir == config.checkpoints.dir
    fresh = job_argv(config.job, [], Path(config.checkpoints.dir), StartFrom(None, None), "python")
    with initialize_config_dir(config_dir=str(verl_config_dir), version_base=None):
        assert (
            compose("ppo_trainer", overrides=fresh[fresh.index("verl.trainer.main_ppo") + 1 :]).trainer.resume_mode
            == "disable"
        )


# --- job command ---


def test_job_argv_resumes_or_starts_fresh() -> None:
    job = JobConfig(name="j", argv=["{python}", "-m", "trainer"], args=["a=1"])
    resumed = job_argv(job, ["b=2"], Path("/ck"), StartFrom("/ck/global_step_4", 4), "/usr/bin/python3")
    assert resumed == [
        "/usr/bin/python3",
        "-m",
        "trainer",
        "a=1",
        "b=2",
        "trainer.default_local_dir=/ck",
        "trainer.resume_mode=resume_path",
        "trainer.resume_from_path=/ck/global_step_4",
    ]
    fresh = job_argv(job, [], Path("/ck"), StartFrom(None, None), "py")
    assert fresh[-1] == "trainer.resume_mode=disable"


def test_job_args_that_the_supervisor_owns_are_refused() -> None:
    job = JobConfig(name="j", argv=["x"])
    user = ["trainer.total_training_steps=3", "trainer.resume_mode=auto", "++trainer.default_local_dir=/x"]
    assert conflicting_args(job, user) == ["trainer.resume_mode=auto", "++trainer.default_local_dir=/x"]


def test_job_args_follow_the_double_dash() -> None:
    assert split_job_args(["a=1", "--", "b=2", "--", "c"]) == (["a=1"], ["b=2", "--", "c"])
    assert split_job_args(["a=1"]) == (["a=1"], [])


# --- history and run directory ---


def test_history_round_trips_and_refuses_to_leave_finished() -> None:
    history = RunHistory(run_id="abc")
    history.attempts.append(AttemptRecord(1, 10.0, None, ["x"], ended_at=11.0, action=Action.restart, reached_step=2))
    history.saw_checkpoint(2)
    history.saw_checkpoint(None)
    history.move_to(RunState.BACKING_OFF)
    copy = RunHistory.from_dict(json.loads(json.dumps(history.to_dict())))
    assert copy == history
    history.finish(0, "done")
    with pytest.raises(IllegalTransition):
        history.move_to(RunState.ATTEMPT_RUNNING)
    with pytest.raises(IllegalTransition):
        history.finish(0, "done")


def test_second_holder_of_a_run_directory_is_refused(tmp_path: Path) -> None:
    first = RunDirectory(tmp_path / "run")
    first.acquire()
    try:
        with pytest.raises(RunDirectoryInUse, match="in use by another supervisor"):
            RunDirectory(tmp_path / "run").acquire()
    finally:
        first.release()
    again = RunDirectory(tmp_path / "run")
    again.acquire()
    again.release()


def test_state_file_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = RunDirectory(tmp_path)
    history = RunHistory(run_id="r")
    run_dir.save_history(history)
    history.attempts.append(AttemptRecord(1, 1.0, None))
    run_dir.save_history(history)
    assert run_dir.load_history() == history
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"], "no temporary file is left behind"

    # The machine dies after the new state is written and before it is on disk: a reader (the next
    # supervisor) must find the old state whole, which a write in place cannot promise.
    def power_cut(fd: int) -> None:
        raise OSError("power cut")

    before = (tmp_path / "state.json").read_text()
    history.attempts.append(AttemptRecord(2, 2.0, None))
    monkeypatch.setattr(os, "fsync", power_cut)
    with pytest.raises(OSError, match="power cut"):
        run_dir.save_history(history)
    assert (tmp_path / "state.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"], "the partial file is not left behind"


def test_events_are_json_lines_with_time_and_run_id(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl", "run-1", console=None)
    log.emit(AttemptStarted(1, 42, ["a"], None, None, "/logs/1"))
    log.emit(RunFinished(0, "done", "finished", 1))
    events = read_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in events] == ["attempt_started", "run_finished"]
    assert all(e["run_id"] == "run-1" and isinstance(e["ts"], float) for e in events)
    assert events[0]["pid"] == 42


def test_attempts_table_has_a_row_per_attempt() -> None:
    history = RunHistory(run_id="r")
    history.attempts.append(
        AttemptRecord(
            1,
            0.0,
            None,
            ended_at=1.0,
            exit_code=75,
            action=Action.restart,
            rule="weight-sync-failure",
            error_type="verl_hooks.errors.WeightSyncFatalError",
            phase="update_weights",
            reached_step=2,
        )
    )
    history.attempts.append(
        AttemptRecord(2, 2.0, 2, ended_at=3.0, exit_code=0, action=Action.done, rule="success", reached_step=6)
    )
    history.finish(0, "done")
    table = attempts_table(history).splitlines()
    assert table[1].split() == ["attempt", "started", "ended", "exit", "classification", "resumed", "from", "reached"]
    assert "restart (WeightSyncFatalError@update_weights)" in table[3]
    assert " fresh " in table[3]
    assert table[3].rstrip().endswith("step 2")
    assert table[4].rstrip().endswith("step 6")
    assert table[-1] == "outcome: done (exit 0)"


def test_the_embedded_cluster_is_closed_by_default_and_cluster_modes_follow_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    local = to_supervisor_config(compose_config([f"run_dir={tmp_path}/run"]))
    assert (local.ray.auth_mode, local.ray.auth_token_path) == ("token", f"{tmp_path}/run/ray_auth_token")
    opened = to_supervisor_config(compose_config([f"run_dir={tmp_path}/run", "ray.auth_mode=disabled"]))
    assert (opened.ray.auth_mode, opened.ray.auth_token_path) == ("disabled", None), "the user's choice wins"
    plain = to_supervisor_config(compose_config([f"run_dir={tmp_path}/run", "ray.mode=address"]))
    assert (plain.ray.auth_mode, plain.ray.auth_token_path) == ("disabled", None)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/etc/ray/token")
    address = to_supervisor_config(compose_config([f"run_dir={tmp_path}/run", "ray.mode=address"]))
    assert (address.ray.auth_mode, address.ray.auth_token_path) == ("token", "/etc/ray/token")


def test_the_runs_token_is_drawn_once_and_readable_by_the_user_only(tmp_path: Path) -> None:
    from supervisor.mechanisms.ray_auth import apply_auth_env, ensure_run_token

    token = tmp_path / "ray_auth_token"
    assert ensure_run_token(token) is True
    assert token.stat().st_mode & 0o777 == 0o600
    first = token.read_text()
    assert len(first) == 64
    token.chmod(0o644)
    assert ensure_run_token(token) is False, "a supervisor restarted on the run keeps the run's token"
    assert (token.read_text(), token.stat().st_mode & 0o777) == (first, 0o600)
    environ = {"RAY_AUTH_TOKEN": "someone-elses"}
    apply_auth_env("token", str(token), environ)
    assert environ == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}, "the path, never the token"


def test_secret_looking_arguments_are_redacted_where_they_are_shown() -> None:
    from supervisor.job.command import redact_argv

    argv = ["python", "-m", "job", "trainer.wandb_api_key=abc", "+job.env.HF_TOKEN=hf_x", "db.password=p", "seed=1"]
    assert redact_argv(argv) == [
        "python",
        "-m",
        "job",
        "trainer.wandb_api_key=<redacted>",
        "+job.env.HF_TOKEN=<redacted>",
        "db.password=<redacted>",
        "seed=1",
    ]


def test_a_refused_call_says_what_to_set() -> None:
    from supervisor.mechanisms.ray_auth import refusal_hint

    refused = RuntimeError("HTTP 401 Unauthorized\nbody follows")
    assert refusal_hint(refused, "disabled").endswith("set ray.auth_mode=token and ray.auth_token_path=FILE")
    assert "refused the token" in refusal_hint(refused, "token")
    assert refusal_hint(ConnectionError("connection refused"), "token") == "connection refused"


def test_the_run_finished_line_counts_its_attempts_in_good_english() -> None:
    assert RunFinished(0, "done", "finished", 1).describe().endswith("after 1 attempt: finished")
    assert RunFinished(3, "failed", "no budget", 4).describe().endswith("after 4 attempts: no budget")


def test_the_shipped_yaml_repeats_no_default_of_the_schema() -> None:
    """Defaults live in one place, the schema's dataclasses: a value the YAML repeats could drift from it."""
    shipped = yaml.safe_load((REPO_ROOT / "conf" / "supervisor.yaml").read_text())
    assert set(shipped) == {"defaults", "run_dir", "rules"}, "the YAML sets only what the schema cannot default"
    assert SupervisorConfig.__dataclass_fields__["rules"].default_factory() == [], "the rules come from the YAML"


def test_every_event_names_its_kind_once() -> None:
    def subclasses(cls: type) -> list[type]:
        return [sub for direct in cls.__subclasses__() for sub in (direct, *subclasses(direct))]

    kinds = [event.kind for event in subclasses(Event)]
    assert len(kinds) == len(set(kinds)) >= 24
