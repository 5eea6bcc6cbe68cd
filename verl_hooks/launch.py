"""Run a verl job's driver with the weight-sync guard installed in every process of the job.

    python -m verl_hooks.launch -m verl.trainer.main_ppo <hydra overrides>

- installs the guard in this process, and puts ``verl_hooks.install`` into the runtime_env of the job's
  ``ray.init`` as its ``worker_process_setup_hook`` (chaining a hook the job already has), together with the
  ``VERL_HOOKS_*`` and ``VERL_SUPERVISOR_*`` variables, so the guard reaches the TaskRunner actor on any node;
- when the job's arguments name ``SupervisorCheckpointCallback`` as ``trainer.checkpoint_callback_class`` (the
  ``verl_ppo`` preset does) and the user named a callback of their own as well, keeps ours in verl's config and
  hands theirs over in ``$VERL_HOOKS_CHAINED_CHECKPOINT_CALLBACK``: ours runs it first, then writes the marker;
- runs the module as ``python -m`` would, with ``HYDRA_FULL_ERROR=1`` so that failures reach the launcher;
- on failure prints the error with its original traceback, writes an error record to
  ``$VERL_SUPERVISOR_ERROR_FILE`` when set, and exits with a code that says what kind of failure it was.

Exit codes: 0 success; 1 any other failure; 2 usage error (no module, module not found); 75 the job died of a
``WeightSyncFatalError`` (EX_TEMPFAIL: restart it); 78 a configuration error a restart cannot fix (a Hydra or
OmegaConf error, bad ``VERL_HOOKS_*`` settings, a verl the guard does not support); 130 interrupted; 143 stopped at
the supervisor's request (``restart.save_on_stop_s``), after saving the step it was at when it could.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import logging
import os
import runpy
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from verl_hooks import heartbeat
from verl_hooks.contract import (
    CHECKPOINT_CALLBACK_CLASS,
    ENV_CHAINED_CHECKPOINT_CALLBACK,
    ENV_CHAINED_SETUP_HOOK,
    SETUP_HOOK,
    EmergencyCheckpoint,
    ErrorRecord,
    JobExitCode,
    RecordSource,
    exception_chain,
    forwarded_env,
    injected_runtime_env,
    read_record,
    write_record,
)
from verl_hooks.errors import HookSettingsError, IncompatibleVerlError, find_stop_request, find_weight_sync_error
from verl_hooks.installer import install
from verl_hooks.record import record_for_exception
from verl_hooks.settings import HookSettings, error_file

# How long the job's atexit handlers (Ray's shutdown, loggers) may take on the way out of a failed job.
EXIT_HANDLERS_BUDGET_S = 10.0
_CONFIG_ERROR_MODULES = ("hydra.errors", "omegaconf.errors")

USAGE = "usage: python -m verl_hooks.launch -m MODULE [ARGS...]"

CHECKPOINT_CALLBACK_KEY = "trainer.checkpoint_callback_class"


def with_guard(
    runtime_env: Mapping[str, Any] | None,
    forwarded: Mapping[str, str],
    injected: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``runtime_env`` with our setup hook and variables added, never changing what the job set itself.

    ``injected`` is the runtime_env Ray's Jobs API injected into this driver (``RAY_JOB_CONFIG_JSON_ENV_VAR``):
    Ray refuses to merge it with ``ray.init``'s when both set the same field or variable, so whatever it already
    has is not added again.
    """
    env = dict(runtime_env or {})
    injected = injected or {}
    env_vars = dict(env.get("env_vars") or {})
    injected_vars = injected.get("env_vars") or {}
    for key, value in forwarded.items():
        if key not in env_vars and key not in injected_vars:
            env_vars[key] = value
    hook = env.get("worker_process_setup_hook")
    if hook is None:
        if injected.get("worker_process_setup_hook") != SETUP_HOOK:
            env["worker_process_setup_hook"] = SETUP_HOOK
    elif isinstance(hook, str):
        if hook != SETUP_HOOK:
            env_vars[ENV_CHAINED_SETUP_HOOK] = hook
            env["worker_process_setup_hook"] = SETUP_HOOK
    else:
        env["worker_process_setup_hook"] = functools.partial(_install_then, hook)
    if env_vars:
        env["env_vars"] = env_vars
    return env


def _install_then(hook: Callable[[], Any]) -> Any:
    install()
    return hook()


def route_guard_into_ray_init(environ: Mapping[str, str]) -> None:
    """Make every ``ray.init`` of this process carry the guard into the job's workers."""
    import ray

    original = ray.init
    if getattr(original, "__verl_hooks_routed__", False):
        return
    forwarded = forwarded_env(environ)
    injected = injected_runtime_env(environ)

    @functools.wraps(original)
    def init(*args: Any, **kwargs: Any) -> Any:
        kwargs["runtime_env"] = with_guard(kwargs.get("runtime_env"), forwarded, injected)
        return original(*args, **kwargs)

    init.__verl_hooks_routed__ = True  # type: ignore[attr-defined]
    ray.init = init


VERL_CHECKPOINT_CALLBACK_MODULE = "verl.trainer.ppo.checkpoint_callback"
"""verl 0.9.1's checkpoint callbacks; verl 0.9.0 has neither the module nor ``trainer.checkpoint_callback_class``."""


def without_checkpoint_callback_where_verl_has_none(
    args: Sequence[str], has_callbacks: bool | None = None
) -> tuple[list[str], str | None]:
    """The job's overrides without our ``trainer.checkpoint_callback_class`` when the installed verl has no
    checkpoint callbacks (0.9.0: Hydra would refuse the key), and the note that says so (None: nothing dropped).
    Its steps then carry no marker, and the supervisor judges them by their layout alone."""
    ours = [arg for arg in args if (parsed := _callback_override(arg)) and parsed[1] == CHECKPOINT_CALLBACK_CLASS]
    if not ours:
        return list(args), None
    if has_callbacks is None:
        has_callbacks = _verl_has_checkpoint_callbacks()
    if has_callbacks:
        return list(args), None
    kept = [arg for arg in args if arg not in ours]
    return kept, (
        f"the installed verl has no checkpoint callbacks ({VERL_CHECKPOINT_CALLBACK_MODULE}, verl 0.9.1+): "
        f"{CHECKPOINT_CALLBACK_CLASS} is left out, and the supervisor judges each step by its layout alone"
    )


def _verl_has_checkpoint_callbacks() -> bool:
    """Whether the installed verl ships the module, looked up as a file: importing verl's package costs seconds."""
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        return False
    relative = VERL_CHECKPOINT_CALLBACK_MODULE.split(".", 1)[1].replace(".", os.sep) + ".py"
    return any(os.path.exists(os.path.join(root, relative)) for root in spec.submodule_search_locations)


def chain_checkpoint_callback(args: Sequence[str]) -> tuple[list[str], str | None]:
    """The job's Hydra overrides with every ``trainer.checkpoint_callback_class`` naming ours, and the class the
    user named (the one Hydra would have picked had ours not been there), to be chained behind ours.

    Only when ours is named at all: the launcher runs jobs that know nothing of it, and their callbacks are
    theirs. A ``null`` of the user's chains nothing; a deletion (``~key``) is left as it is, and so is a prefix
    (``+``/``++``): Hydra accepts or refuses it as it would have with the user's value.
    """
    args = list(args)
    found = [(index, *parsed) for index, arg in enumerate(args) if (parsed := _callback_override(arg)) is not None]
    if not any(value == CHECKPOINT_CALLBACK_CLASS for _, _, value in found):
        return args, None
    theirs = [value for _, _, value in found if value != CHECKPOINT_CALLBACK_CLASS]
    chained = theirs[-1] if theirs and theirs[-1].lower() not in ("", "null") else None
    for index, prefix, value in found:
        if value != CHECKPOINT_CALLBACK_CLASS:
            args[index] = f"{prefix}{CHECKPOINT_CALLBACK_KEY}={CHECKPOINT_CALLBACK_CLASS}"
    return args, chained


def _callback_override(arg: str) -> tuple[str, str] | None:
    """(prefix, value) of a Hydra override that sets ``trainer.checkpoint_callback_class``; None for any other."""
    key, sep, value = arg.partition("=")
    prefix = key[: len(key) - len(key.lstrip("+"))]
    if not sep or key[len(prefix) :].strip() != CHECKPOINT_CALLBACK_KEY:
        return None
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return prefix, value


def exit_code_for(exc: BaseException) -> JobExitCode:
    if find_weight_sync_error(exc) is not None:
        return JobExitCode.WEIGHT_SYNC_FATAL
    if find_stop_request(exc) is not None:
        return JobExitCode.STOPPED
    if isinstance(exc, KeyboardInterrupt):
        return JobExitCode.INTERRUPTED
    if _is_config_error(exc):
        return JobExitCode.CONFIG_ERROR
    return JobExitCode.FAILURE


def _is_config_error(exc: BaseException) -> bool:
    return any(
        isinstance(current, (HookSettingsError, IncompatibleVerlError))
        or type(current).__module__.startswith(_CONFIG_ERROR_MODULES)
        for current in exception_chain(exc)
    )


def report_failure(exc: BaseException, settings: HookSettings) -> int:
    """Print the failure, record it, and return the exit code it calls for."""
    code = exit_code_for(exc)
    backstop = _backstop_record(settings)
    if backstop is not None:
        # The guard's backstop ended a worker (the TaskRunner, say) after a weight-sync hang: the driver only
        # sees that actor die, but the root cause, already on record, is the weight sync.
        code = JobExitCode.WEIGHT_SYNC_FATAL
    record = record_for_exception(exc, exit_code=code, source=RecordSource.LAUNCHER, attempt=settings.attempt)
    if code in (JobExitCode.CONFIG_ERROR, JobExitCode.STOPPED):
        # A configuration error's message is the whole story, and so is a stop; the traceback goes to the record.
        print(f"Error: {_messages(exc)}" if code == JobExitCode.CONFIG_ERROR else record.message, file=sys.stderr)
    else:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"verl_hooks.launch: {_summary(backstop or record, code)}", file=sys.stderr)
    deliver_record(record, settings)
    return code


def _backstop_record(settings: HookSettings) -> ErrorRecord | None:
    """The record the guard's backstop left in this attempt's record file, if it did."""
    earlier = read_record(settings.error_file) if settings.error_file else None
    return earlier if earlier is not None and earlier.source is RecordSource.GUARD_BACKSTOP else None


def deliver_record(record: ErrorRecord, settings: HookSettings) -> None:
    """To the record file when it can be written here, and to the supervisor over the heartbeat channel (which
    reaches it when this driver runs on another machine)."""
    if settings.error_file:
        try:
            write_record(settings.error_file, record)
        except OSError as exc:
            print(
                f"verl_hooks.launch: could not write the error record to {settings.error_file}: {exc}", file=sys.stderr
            )
    heartbeat.send_record(record)


def _messages(exc: BaseException) -> str:
    parts = [str(current) or type(current).__name__ for current in exception_chain(exc, limit=8)]
    return "\n".join(dict.fromkeys(parts))


def _summary(record: ErrorRecord, code: int) -> str:
    emergency = EmergencyCheckpoint.from_dict(record.emergency_checkpoint)
    saved = f"; emergency checkpoint: {emergency.summary()}" if emergency is not None else ""
    if code == JobExitCode.WEIGHT_SYNC_FATAL:
        cleanup = ", ".join(f"{o['step']} {o['status']}" for o in record.cleanup) or "none needed"
        return (
            f"the job died of a weight-sync failure in phase '{record.phase}' at global step {record.global_step} "
            f"(rollout cleanup: {cleanup}{saved}); exit {code} so that a supervisor restarts it from its last "
            "checkpoint"
        )
    if code == JobExitCode.STOPPED:
        return f"the job stopped at the supervisor's request after the weight sync of step {record.global_step}{saved}"
    return f"the job failed ({record.error_type}); exit {code}"


def run_module(module: str, args: Sequence[str]) -> None:
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _exit(code: int) -> NoReturn:
    """Exit with ``code``. A failed job's exit handlers get a bounded time: a job that failed mid-sync can
    leave a thread blocked for good, and the supervisor must see the exit at once."""
    if code == 0:
        sys.exit(0)
    runner = threading.Thread(target=atexit._run_exitfuncs, name="verl-hooks-exit", daemon=True)
    runner.start()
    runner.join(EXIT_HANDLERS_BUDGET_S)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _exit_recorded(code: int, error_type: str, message: str, settings: HookSettings) -> NoReturn:
    """Exit with ``code`` for a failure that has no exception worth a traceback."""
    if code != 0:
        record = ErrorRecord(
            error_type=error_type,
            message=message,
            source=RecordSource.LAUNCHER,
            exit_code=code,
            attempt=settings.attempt,
        )
        deliver_record(record, settings)
    _exit(code)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = HookSettings.from_env()
    except HookSettingsError as exc:
        fallback = HookSettings(error_file=error_file())
        _exit(report_failure(exc, fallback))
    if len(args) < 2 or args[0] != "-m":
        print(USAGE, file=sys.stderr)
        _exit_recorded(JobExitCode.USAGE, "UsageError", USAGE, settings)
    module, job_args = args[1], args[2:]
    if not _module_exists(module):
        message = f"no module named {module!r} (is it installed in this environment?)"
        print(f"verl_hooks.launch: {message}", file=sys.stderr)
        _exit_recorded(JobExitCode.USAGE, "UsageError", message, settings)
    job_args, dropped = without_checkpoint_callback_where_verl_has_none(job_args)
    if dropped:
        print(f"verl_hooks.launch: {dropped}", file=sys.stderr)
    job_args, chained = chain_checkpoint_callback(job_args)
    if chained is not None:
        # Before the runtime_env is built: the callback runs in verl's TaskRunner actor, not here.
        os.environ[ENV_CHAINED_CHECKPOINT_CALLBACK] = chained
        note = f"{CHECKPOINT_CALLBACK_KEY}={chained} runs first, chained by {CHECKPOINT_CALLBACK_CLASS}"
        print(f"verl_hooks.launch: {note}", file=sys.stderr)
    install(settings)
    heartbeat.start_alive_beats()
    route_guard_into_ray_init(os.environ)
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        run_module(module, job_args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else JobExitCode.FAILURE)
        _exit_recorded(code, "SystemExit", f"the job exited with code {code}", settings)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then ends the process
        _exit(report_failure(exc, settings))
    _exit(0)


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


if __name__ == "__main__":
    main()
