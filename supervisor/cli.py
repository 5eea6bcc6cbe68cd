"""``verl-supervisor`` (also ``python -m supervisor``): compose the configuration, then run the loop.

    verl-supervisor [--config-dir DIR] [--config-name NAME] [--cfg] [OVERRIDE ...] [-- JOB ARG ...]
    verl-supervisor status RUN_DIR [--json]
    verl-supervisor report RUN_DIR [--out DIR]
    verl-supervisor check        (the installed Ray, verl, torch and NVML: what is verified; exit 2 if not)

Configuration errors (an unknown key, a wrong type, a bad value) are one line on stderr and exit code 2,
before anything is started. Hydra's compose API is used rather than ``@hydra.main`` so that the supervisor
decides its exit codes and its run directory itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from supervisor.backends.base import JobBackend
from supervisor.config import (
    RUN_TOKEN_FILE,
    RayMode,
    SupervisorConfig,
    TeardownConfig,
    auth_mode_of,
    host_of,
    resolve_cluster,
    validate,
)
from supervisor.job.command import conflicting_args
from supervisor.mechanisms import orphans
from supervisor.mechanisms.processes import local_ip_towards, terminate_processes, with_descendants
from supervisor.mechanisms.ray_auth import apply_auth_env, ensure_run_token
from supervisor.mechanisms.reaper import Reaper, start_reaper
from supervisor.outcomes import ExitCode
from supervisor.run.events import EventLog, MetricsServing
from supervisor.run.history import RunHistory
from supervisor.run.rundir import DamagedRunFile, RunDirectory, RunDirectoryInUse
from verl_hooks.contract import ENV_RUN_ID, exception_chain

SCHEMA_NAME = "supervisor_schema"


class UsageError(Exception):
    """A problem with the command line or the configuration: exit code 2, nothing started."""


def builtin_config_dir() -> Path:
    """The presets: inside the installed package (a wheel), or the repository's conf/ (a source checkout)."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def split_job_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Everything after the first ``--`` belongs to the job."""
    args = list(argv)
    if "--" in args:
        cut = args.index("--")
        return args[:cut], args[cut + 1 :]
    return args, []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="verl-supervisor",
        description="Run a verl job, restart it from its last complete checkpoint when it fails.",
        epilog="Overrides are Hydra's (key=value, job=verl_ppo, +job.env.NAME=value). Arguments after -- go to "
        "the job. Other commands: status RUN_DIR, report RUN_DIR, check (what of Ray, verl, torch and NVML is "
        "installed and verified). Exit codes: " + ", ".join(f"{int(code)} {code.short}" for code in ExitCode) + ".",
    )
    parser.add_argument("--config-dir", type=Path, help="a folder of presets of your own (job/<name>.yaml, ...)")
    parser.add_argument("--config-name", default="supervisor", help="the primary config (default: supervisor)")
    parser.add_argument("--cfg", action="store_true", help="print the composed configuration and exit")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    return parser


def compose_config(overrides: Sequence[str], config_dir: Path | None = None, config_name: str = "supervisor"):
    """The composed configuration as a DictConfig; raises UsageError with a one-line message."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=SupervisorConfig)
    extra = list(overrides)
    if config_dir is not None:
        if not config_dir.is_dir():
            raise UsageError(f"--config-dir {config_dir} is not a directory")
        extra.append(f"hydra.searchpath=[file://{config_dir.resolve()}]")
    try:
        with initialize_config_dir(config_dir=str(builtin_config_dir()), version_base=None):
            cfg = compose(config_name, overrides=extra, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UsageError(_one_line(exc)) from None
    runtime = cfg.hydra.runtime
    folders = [Path(source.path) for source in runtime.config_sources if source.schema == "file"]
    problem = preset_keys_overridden(folders, config_name, runtime.choices.get("job"))
    if problem:
        raise UsageError(problem)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _first_file(folders: Sequence[Path], name: str) -> Path | None:
    """The file Hydra takes for ``name``: the first of its search path's folders that holds it."""
    return next((folder / name for folder in folders if (folder / name).is_file()), None)


def _is_global(preset: Path) -> bool:
    """The preset's header puts its keys at the top level: ``# @package _global_`` among its leading comment
    lines, blank and indented ones included, as Hydra reads a header."""
    for line in preset.read_text().splitlines():
        text = line.strip()
        if not text:
            continue
        if not text.startswith("#"):
            return False
        if text.lstrip("#").split() == ["@package", "_global_"]:
            return True
    return False


def preset_keys_overridden(folders: Sequence[Path], config_name: str, job_choice: str | None) -> str | None:
    """A global job preset's top-level keys that the primary config also sets are replaced by the primary's,
    silently (the primary composes ``_self_`` last): the one line that says so and where such keys go, or None.
    """
    preset = _first_file(folders, f"job/{job_choice}.yaml") if job_choice else None
    primary = _first_file(folders, f"{config_name}.yaml")
    if preset is None or primary is None or not _is_global(preset):
        return None
    preset_keys, primary_keys = set(OmegaConf.load(preset)), set(OmegaConf.load(primary))
    clashing = sorted((preset_keys & primary_keys) - {"defaults"})
    if not clashing:
        return None
    where = {"rules": "put them under extra_rules:, matched before the built-in rules, which stay"}
    advice = "; ".join(f"{key}: {where.get(key, 'set it on the command line')}" for key in clashing)
    return (
        f"job preset {preset} sets {', '.join(clashing)}, which {primary.name} sets too and would replace without "
        f"a word (Hydra composes the primary config last): {advice}"
    )


def to_supervisor_config(cfg) -> SupervisorConfig:
    try:
        # Hydra lets `+key=value` add a key the schema does not have; merging onto the schema refuses it.
        OmegaConf.merge(OmegaConf.structured(SupervisorConfig), OmegaConf.to_container(cfg, resolve=False))
        config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise UsageError(_one_line(exc)) from None
    assert isinstance(config, SupervisorConfig)
    config.run_dir = str(Path(config.run_dir).expanduser().resolve())
    config.checkpoints.dir = str(Path(config.checkpoints.dir).expanduser().resolve())
    problems = validate(config) + resolve_cluster(config, os.environ)
    if problems:
        raise UsageError("; ".join(problems))
    config.watchdog.listen_host = heartbeat_listen_host(config)
    return config


def heartbeat_listen_host(config: SupervisorConfig) -> str:
    """Where the job's heartbeats can reach the supervisor: loopback for an embedded cluster, otherwise the
    address this machine uses towards the cluster (a job's processes on other nodes post there)."""
    if config.watchdog.listen_host:
        return config.watchdog.listen_host
    if config.ray.mode is RayMode.local:
        return "127.0.0.1"
    cluster_host = host_of(config.ray.address or "")
    try:
        return local_ip_towards(cluster_host)
    except OSError as exc:
        raise UsageError(
            f"no route from this machine to the Ray cluster's host {cluster_host!r} ({exc}); set watchdog.listen_host"
        ) from None


def _one_line(exc: BaseException) -> str:
    parts = []
    for current in exception_chain(exc, limit=4):
        text = str(current).strip().splitlines()
        line = text[0].rstrip(".") if text else ""
        if line and line not in parts:
            parts.append(line)
    return ": ".join(parts) or type(exc).__name__


def inspect_main(argv: Sequence[str]) -> ExitCode:
    """``status`` and ``report``: read a run directory, live or finished; they change nothing in it."""
    command, rest = argv[0], list(argv[1:])
    parser = argparse.ArgumentParser(prog=f"verl-supervisor {command}")
    parser.add_argument("run_dir", type=Path)
    if command == "status":
        parser.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    else:
        parser.add_argument("--out", type=Path, help="folder for report.md and timeline.png (default: RUN_DIR/report)")
    args = parser.parse_args(rest)
    from supervisor.run.status import NotARunDirectory, StatusReader, render_status

    try:
        if command == "status":
            status = StatusReader(args.run_dir.expanduser().resolve()).read()
            print(json.dumps(status.to_dict(), indent=2, sort_keys=True) if args.json else render_status(status))
            return ExitCode.DONE
        from supervisor.run.report import write_report

        run_dir = args.run_dir.expanduser().resolve()
        report, picture = write_report(run_dir, (args.out or run_dir / "report").expanduser().resolve())
    except (NotARunDirectory, DamagedRunFile) as exc:
        print(f"verl-supervisor {command}: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(f"report: {report}")
    print(f"timeline: {picture}" if picture else "timeline: not drawn (matplotlib is not installed)")
    return ExitCode.DONE


INSPECT_COMMANDS = ("status", "report")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in INSPECT_COMMANDS:
        sys.exit(int(inspect_main(argv)))
    if argv[:1] == ["check"]:
        from supervisor.check import main as check_main

        sys.exit(check_main())
    ours, job_args = split_job_args(argv)
    args = _parser().parse_args(ours)
    try:
        cfg = compose_config(args.overrides, args.config_dir, args.config_name)
        if args.cfg:
            print(OmegaConf.to_yaml(cfg, resolve=False), end="")
            sys.exit(ExitCode.DONE)
        config = to_supervisor_config(cfg)
        conflicts = conflicting_args(config.job, job_args)
        if conflicts:
            raise UsageError(
                f"the supervisor decides where checkpoints go and where each attempt resumes from; remove "
                f"{', '.join(conflicts)} from the job's arguments (use checkpoints.dir=... for the checkpoint folder)"
            )
        code = run(config, job_args)
    except UsageError as exc:
        print(f"verl-supervisor: error: {exc}", file=sys.stderr)
        code = ExitCode.USAGE
    sys.exit(int(code))


def make_backend(
    config: SupervisorConfig, run_dir: RunDirectory, run_id: str, reaper: Reaper | None = None
) -> JobBackend:
    from supervisor.backends.child_driver import ChildDriverBackend
    from supervisor.backends.clusters import EmbeddedCluster, ExistingCluster
    from supervisor.backends.jobs import JobsBackend

    if config.ray.mode is RayMode.jobs:
        return JobsBackend(config.ray, config.teardown, run_id)
    adopt = reaper.adopt if reaper is not None else None
    if config.ray.mode is RayMode.address:
        cluster = ExistingCluster(config.ray)
    else:
        cluster = EmbeddedCluster(config.ray, run_dir.path / "ray", run_id, config.teardown, adopt)
    return ChildDriverBackend(cluster, config.ray, config.teardown, run_id, on_orphans=adopt)


def _prepare_token(config: SupervisorConfig, run_dir: RunDirectory) -> None:
    """Draw the embedded cluster's token for the run; a token file the user names must exist."""
    path = config.ray.auth_token_path
    if config.ray.auth_mode != "token" or path is None:
        return
    own = run_dir.path / RUN_TOKEN_FILE
    if config.ray.mode is RayMode.local and Path(path).resolve() == own.resolve():
        ensure_run_token(own)
    elif not Path(path).expanduser().is_file():
        raise UsageError(f"ray.auth_token_path={path}: no such file (it must hold the cluster's token)")


def _start_observers(
    config: SupervisorConfig,
    run_dir: RunDirectory,
    history: RunHistory,
    events: EventLog,
    stack: contextlib.ExitStack,
) -> None:
    """The metrics endpoint and the webhook, when configured; ``stack`` stops them when the run ends."""
    if config.metrics.port is not None:
        from supervisor.run.metrics import serve_metrics

        run_dir.save_history(history)  # scrapes read state.json: it exists from the first one
        try:
            server = serve_metrics(run_dir.path, config.metrics.host, config.metrics.port)
        except OSError as exc:
            raise UsageError(f"metrics.port={config.metrics.port}: cannot listen on {config.metrics.host} ({exc})")
        stack.callback(server.stop)
        events.emit(MetricsServing(server.url))
    if config.notify.webhook_url:
        from supervisor.run.notify import WebhookNotifier

        notifier = WebhookNotifier(
            config.notify.webhook_url, dict(config.notify.headers), config.notify.timeout_s, events.emit
        )
        events.listeners.append(notifier.on_event)
        stack.callback(notifier.close)


def _end_orphans(teardown: TeardownConfig) -> None:
    """The last sweep: whatever the run's processes orphaned to this process and is still running."""
    left = with_descendants(orphans.adopted())
    if left:
        report = terminate_processes(left, teardown.straggler_grace_s, reap_timeout_s=teardown.reap_timeout_s)
        ended = ", ".join(f"{p.name}[{p.pid}]" for p in (*report.terminated, *report.killed))
        print(f"verl-supervisor: ended what the run orphaned: {ended}", file=sys.stderr)
    orphans.reap_adopted()


def run(config: SupervisorConfig, job_args: Sequence[str]) -> ExitCode:
    """Run the supervisor on a validated configuration; returns its exit code."""
    from supervisor.job.heartbeats import HeartbeatServer
    from supervisor.loop import RunAlreadyFinished, Supervisor, new_history

    run_dir = RunDirectory(Path(config.run_dir))
    try:
        run_dir.acquire()
    except RunDirectoryInUse as exc:
        raise UsageError(str(exc)) from None
    try:
        _prepare_token(config, run_dir)
        # The supervisor is a client of the cluster too (state API, GCS), and the cluster's processes and the
        # job inherit its environment: the auth mode and the token's path are set once, here.
        apply_auth_env(auth_mode_of(config.ray).value, config.ray.auth_token_path, os.environ)
        try:
            history = new_history(run_dir)
        except (RunAlreadyFinished, DamagedRunFile) as exc:
            raise UsageError(str(exc)) from None
        events = EventLog(run_dir.events_path, history.run_id)
        # What the job's processes orphan comes to this process, whatever its environment (see the module).
        why_not = orphans.become_subreaper()
        if why_not:
            print(f"verl-supervisor: warning: orphans of the job will not be caught: {why_not}", file=sys.stderr)
        # Should this process die outright, the reaper ends the run's processes at once (see its module).
        heartbeats = HeartbeatServer(config.watchdog.listen_host, config.watchdog.advertise_host)
        heartbeats.start()
        reaper = start_reaper({ENV_RUN_ID: history.run_id})
        try:
            backend = make_backend(config, run_dir, history.run_id, reaper)
            with contextlib.ExitStack() as observers:
                _start_observers(config, run_dir, history, events, observers)
                supervisor = Supervisor(
                    config, job_args, run_dir, history, backend, events, heartbeats=heartbeats, inherited_env=os.environ
                )
                return supervisor.run()
        finally:
            _end_orphans(config.teardown)
            reaper.disarm()
            heartbeats.stop()
    finally:
        run_dir.release()
