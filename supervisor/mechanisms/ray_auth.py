"""Ray token authentication for the supervisor's clusters: the token file, and the environment that carries it.

Ray 2.60 reads the mode from ``RAY_AUTH_MODE`` and the token from ``$RAY_AUTH_TOKEN``, else the file named by
``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (``ray/exceptions.py``, ``AuthenticationError``). Every
process that talks to a cluster (the ``ray start`` processes and the workers they spawn, the job's driver, the
supervisor's own state-API and GCS calls) needs the same two variables, so they are set once in the supervisor's
environment, which all of them inherit. The token itself never enters an event, a log or a record: only its path.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

_TOKEN_BYTES = 32


def ensure_run_token(path: Path) -> bool:
    """The run's token at ``path`` (mode 0600), drawn now if it is not there yet; returns whether it was drawn.

    Created with ``O_EXCL`` and mode 0600 from the start, so that it is never readable by others, not even for an
    instant, and a concurrent creator cannot be overwritten.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)  # ours (it lives in the run directory): never left readable by others
        return False
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(_TOKEN_BYTES))
    return True


def auth_env(mode: str, token_path: str | None) -> dict[str, str]:
    """The variables a client of the cluster needs; the token's path, never the token."""
    env = {"RAY_AUTH_MODE": mode}
    if mode == "token" and token_path:
        env["RAY_AUTH_TOKEN_PATH"] = str(Path(token_path).expanduser().resolve())
    return env


def apply_auth_env(mode: str, token_path: str | None, environ: dict[str, str] | os._Environ[str]) -> None:
    """Set the variables in ``environ`` (the supervisor's own: every child inherits them). A token given directly
    in ``$RAY_AUTH_TOKEN`` would win over the file, so it is dropped when a file is named."""
    environ.update(auth_env(mode, token_path))
    if mode == "token" and token_path:
        environ.pop("RAY_AUTH_TOKEN", None)


_REFUSED_MARKS = ("401", "403", "unauthorized", "forbidden", "authentication", "unauthenticated")


def refusal_hint(error: BaseException | str, mode: str | None) -> str:
    """One line for a call the cluster refused: the error's first line, and what to set when it wants a token."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    if not any(mark in str(error).lower() for mark in _REFUSED_MARKS):
        return first
    if mode != "token":
        return f"{first}: the cluster wants a token; set ray.auth_mode=token and ray.auth_token_path=FILE"
    return f"{first}: the cluster refused the token in ray.auth_token_path (or $RAY_AUTH_TOKEN_PATH)"
