"""The job's command line for an attempt: the preset's arguments, the user's, and the supervisor's own."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisor.config import JobConfig


@dataclass(frozen=True)
class StartFrom:
    """Where the next attempt starts: a checkpoint folder, or from scratch (both None)."""

    checkpoint: str | None
    step: int | None


def _key(override: str) -> str:
    """The config key a Hydra override sets: ``++trainer.x=1`` -> ``trainer.x``."""
    return override.split("=", 1)[0].lstrip("+~")


def supervisor_owned_keys(job: JobConfig) -> set[str]:
    keys = {_key(arg) for arg in [*job.resume_args, *job.fresh_start_args]}
    if job.checkpoint_dir_arg:
        keys.add(job.checkpoint_dir_arg)
    return keys


def conflicting_args(job: JobConfig, user_args: Sequence[str]) -> list[str]:
    """User arguments that set what the supervisor decides per attempt (where to save, where to resume)."""
    owned = supervisor_owned_keys(job)
    return [arg for arg in user_args if "=" in arg and _key(arg) in owned]


def job_argv(
    job: JobConfig, user_args: Sequence[str], checkpoint_dir: Path, start: StartFrom, python: str
) -> list[str]:
    command = [python if part == "{python}" else part for part in job.argv]
    args = [*job.args, *user_args]
    if job.checkpoint_dir_arg:
        args.append(f"{job.checkpoint_dir_arg}={checkpoint_dir}")
    if start.checkpoint is not None:
        args += [arg.replace("{checkpoint}", start.checkpoint) for arg in job.resume_args]
    else:
        args += list(job.fresh_start_args)
    return command + args


_SECRET_KEY_RE = re.compile(r"(?i)(token|secret|passw|api_?key|access_?key|credential|private_?key)")
REDACTED = "<redacted>"


def redact_argv(argv: Sequence[str]) -> list[str]:
    """The command line as it may be shown and stored: the value of every ``KEY=VALUE`` whose key looks like a
    secret's (``wandb_api_key=...``, ``+job.env.HF_TOKEN=...``) replaced, so that no secret reaches an event or
    state.json. The process itself gets the real values."""
    shown = []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        shown.append(f"{key}={REDACTED}" if sep and _SECRET_KEY_RE.search(key) else arg)
    return shown
