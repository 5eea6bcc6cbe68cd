"""Checks that the installed verl's ``CheckpointEngineManager`` is the one the guard was written for.

The guard observes phases by standing in for ``self`` inside verl's own ``update_weights`` body, so it depends
on that body calling the manager's phase methods and ``self.actor_wg``. A verl release that renames or inlines
them would make the guard attribute failures to the wrong phase; refusing loudly is better than patching blindly.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import logging
import textwrap
from collections.abc import Callable, Coroutine
from importlib import metadata
from typing import Any

from verl_hooks.contract import ENV_ALLOW_UNVERIFIED_VERL
from verl_hooks.errors import IncompatibleVerlError
from verl_hooks.settings import unverified_verl_allowed

logger = logging.getLogger(__name__)

TESTED_VERL_VERSIONS = ("0.9.0", "0.9.1")
VERL_MANAGER_MODULE = "verl.checkpoint_engine.base"
"""Where verl defines ``CheckpointEngineManager`` (verl 0.9.x)."""

# The update_weights bodies the guard was verified against, by fingerprint (update_weights_fingerprint: the AST
# of verl/checkpoint_engine/base.py's CheckpointEngineManager.update_weights, decorators and docstring left out,
# in a form that is the same on Python 3.10, 3.11 and 3.12: the compatibility matrix found 3.12's ast.dump apart).
# A body that merely still uses the right names may have reordered or added phases, which the guard would then
# mis-name or fail to undo: only these are guarded unless the user opts in (ENV_ALLOW_UNVERIFIED_VERL).
VERIFIED_UPDATE_WEIGHTS = {
    "f979c92e3c1edd084078510f8406b861a01a30387fb83b8abde184f580810429": (
        "verl 0.9.0, 0.9.1 and verl main at 1dda039 (2026-08-22): the same body"
    ),
}

# Manager methods the guard intercepts or calls during cleanup, with the parameters it passes them.
_REQUIRED_METHODS: dict[str, tuple[str, ...]] = {
    "abort_replicas": ("self",),
    "release_kv_cache_replicas": ("self",),
    "build_process_group": ("self", "rollout"),
    "resume_kv_cache_replicas": ("self",),
    "resume_generation_replicas": ("self",),
    "wake_up_replicas": ("self",),
}
# Names verl's update_weights body must use: the phase methods, and the attributes the guard stands in for.
_NAMES_USED_BY_UPDATE_WEIGHTS = frozenset(
    {
        "backend",
        "actor_wg",
        "abort_replicas",
        "release_kv_cache_replicas",
        "build_process_group",
        "update_weights",
        "execute_checkpoint_engine",
        "resume_kv_cache_replicas",
        "resume_generation_replicas",
    }
)


def installed_verl_version() -> str:
    try:
        return metadata.version("verl")
    except metadata.PackageNotFoundError:
        return "unknown"


def original_update_weights(manager_cls: type) -> Callable[..., Coroutine[Any, Any, Any]]:
    """verl's raw ``async def update_weights(self, global_steps=None)``, after checking the manager's shape.

    Raises ``IncompatibleVerlError`` naming the installed verl version and every mismatch found.
    """
    problems: list[str] = []
    wrapper = getattr(manager_cls, "update_weights", None)
    raw = getattr(wrapper, "__wrapped__", None)
    if wrapper is None:
        problems.append("CheckpointEngineManager.update_weights is missing")
    elif raw is None or not inspect.iscoroutinefunction(raw):
        problems.append("update_weights is not an async function wrapped by verl.utils.ray_utils.auto_await")
    else:
        params = _positional_names(raw)
        if params[:2] != ("self", "global_steps") or len(params) != 2:
            problems.append(f"update_weights{inspect.signature(raw)} is not (self, global_steps=None)")
        missing_names = sorted(_NAMES_USED_BY_UPDATE_WEIGHTS - set(raw.__code__.co_names))
        if missing_names:
            problems.append(f"update_weights no longer uses {', '.join(missing_names)}")
    for name, expected in _REQUIRED_METHODS.items():
        method = getattr(manager_cls, name, None)
        if method is None:
            problems.append(f"CheckpointEngineManager.{name} is missing")
            continue
        target = getattr(method, "__wrapped__", method)
        got = _positional_names(target)
        if got[: len(expected)] != expected or _required_count(target) > len(expected):
            problems.append(f"CheckpointEngineManager.{name}{inspect.signature(target)} does not accept {expected}")
    fingerprint = None
    if not problems:
        fingerprint = update_weights_fingerprint(raw)
        if fingerprint not in VERIFIED_UPDATE_WEIGHTS and not unverified_verl_allowed():
            problems.append(
                f"its update_weights body (fingerprint {fingerprint or 'unavailable: no source'}) is not one the "
                f"guard was verified against ({'; '.join(VERIFIED_UPDATE_WEIGHTS.values())}); to guard it anyway, "
                f"at your own risk, set {ENV_ALLOW_UNVERIFIED_VERL}=1"
            )
    if problems:
        raise IncompatibleVerlError(
            f"verl_hooks cannot guard the installed verl {installed_verl_version()} "
            f"(written for verl {', '.join(TESTED_VERL_VERSIONS)}): " + "; ".join(problems) + ". "
            "Refusing to patch CheckpointEngineManager.update_weights. Install a verl version verl_hooks "
            "supports, or run the job without the hook (python -m <module> instead of verl_hooks.launch)."
        )
    version = installed_verl_version()
    if fingerprint not in VERIFIED_UPDATE_WEIGHTS:
        logger.warning(
            "verl_hooks guards the unverified update_weights body of verl %s (fingerprint %s) because %s=1: "
            "a phase it does not know would be misnamed and not undone",
            version,
            fingerprint,
            ENV_ALLOW_UNVERIFIED_VERL,
        )
    elif version not in TESTED_VERL_VERSIONS:
        logger.warning(
            "verl_hooks was tested with verl %s; the installed verl %s has the same CheckpointEngineManager "
            "shape, so the guard is installed",
            ", ".join(TESTED_VERL_VERSIONS),
            version,
        )
    return raw


def update_weights_fingerprint(func: Callable[..., Any]) -> str | None:
    """sha256 of the function's AST without decorators, docstring, line numbers or comments; None without source."""
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return None
    tree = ast.parse(source).body[0]
    if not isinstance(tree, ast.AsyncFunctionDef | ast.FunctionDef):
        return None
    tree.decorator_list = []
    first = tree.body[0] if tree.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        tree.body = tree.body[1:]
    return hashlib.sha256(_canonical(tree).encode()).hexdigest()


def _canonical(node: Any) -> str:
    """The AST as text, the same on every Python: ``ast.dump`` differs between versions in fields a version adds
    (3.12's ``type_params=[]``) and in how it shows empty ones, so fields that are empty or None are left out."""
    if isinstance(node, ast.AST):
        fields = []
        for name, value in ast.iter_fields(node):
            if value is None or value == []:
                continue
            fields.append(f"{name}={_canonical(value)}")
        return f"{type(node).__name__}({', '.join(fields)})"
    if isinstance(node, list):
        return f"[{', '.join(_canonical(item) for item in node)}]"
    return repr(node)


def _positional_names(func: Callable[..., Any]) -> tuple[str, ...]:
    return tuple(
        p.name
        for p in inspect.signature(func).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    )


def _required_count(func: Callable[..., Any]) -> int:
    return sum(
        1
        for p in inspect.signature(func).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    )


def subclass_update_weights(cls: type) -> Callable[..., Coroutine[Any, Any, Any]]:
    """The body of a manager subclass's own ``update_weights``, as a coroutine function the guard can run.

    Accepted: ``(self, global_steps=None, ...)`` with any further parameters optional, async (with or without
    verl's ``auto_await``) or not. Anything else raises ``IncompatibleVerlError`` naming the class: a manager the
    guard cannot wrap must never run unguarded.
    """
    member = cls.__dict__["update_weights"]
    raw = getattr(member, "__wrapped__", member)
    name = f"{cls.__module__}.{cls.__qualname__}.update_weights"
    if not callable(raw):
        raise IncompatibleVerlError(f"verl_hooks cannot guard {name}: it is not a function")
    params = _positional_names(raw)
    if params[:2] != ("self", "global_steps") or _required_count(raw) > 1:
        raise IncompatibleVerlError(
            f"verl_hooks cannot guard {name}{inspect.signature(raw)}: it must accept (self, global_steps=None) "
            "as verl's CheckpointEngineManager.update_weights does; rename its parameters or drop the override"
        )
    if inspect.iscoroutinefunction(raw):
        return raw

    async def call_blocking(self: Any, global_steps: int | None = None) -> Any:
        return raw(self, global_steps)  # runs on the guard's own thread, under the deadline

    call_blocking.__qualname__, call_blocking.__doc__ = raw.__qualname__, raw.__doc__
    return call_blocking


def verl_report() -> dict[str, Any]:
    """What ``verl-supervisor check`` says of the installed verl: its version, its ``update_weights``
    fingerprint, and whether the guard would patch it (a child process of the check runs this: importing verl
    takes seconds and much memory, which the supervisor itself never pays)."""
    report: dict[str, Any] = {"version": installed_verl_version(), "tested": list(TESTED_VERL_VERSIONS)}
    try:
        module = importlib.import_module(VERL_MANAGER_MODULE)
    except Exception as exc:  # noqa: BLE001 - not installed, or broken: the report says which
        return {**report, "guardable": False, "problem": f"cannot import {VERL_MANAGER_MODULE}: {exc}"}
    manager = module.CheckpointEngineManager
    raw = getattr(getattr(manager, "update_weights", None), "__wrapped__", None)
    fingerprint = update_weights_fingerprint(raw) if raw is not None else None
    report.update(fingerprint=fingerprint, verified=VERIFIED_UPDATE_WEIGHTS.get(fingerprint or ""))
    try:
        original_update_weights(manager)
    except IncompatibleVerlError as exc:
        return {**report, "guardable": False, "problem": str(exc)}
    return {**report, "guardable": True, "problem": None}


if __name__ == "__main__":
    import json
    import sys

    logging.basicConfig(level=logging.ERROR)
    print(json.dumps(verl_report()), file=sys.stdout, flush=True)
