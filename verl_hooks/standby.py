"""A job driver started ahead of its attempt: the launcher and the job module's imports are done, and it waits
for its command line.

    python -m verl_hooks.standby MODULE      # then, on stdin, one line: {"argv": [...], "cwd": ...}

A relaunch's driver spends its first seconds importing (``verl.trainer.main_ppo`` imports torch, Ray,
transformers and verl: about 7 s on a 2-core machine). The supervisor starts this process while the attempt
before it trains, with exactly the environment the next attempt gets, so that a relaunch skips those seconds.
It imports what MODULE imports at its top level, not MODULE itself, whose body runs once, as ``__main__``, when
the command comes. Until then it connects to nothing (no Ray, no GPU, no heartbeat) and does nothing: on end of
input (the supervisor discarded it, or died) it exits 0. The line it reads becomes ``verl_hooks.launch``'s
arguments, and the process goes on as a cold launch would have: stdin is ``/dev/null`` again.

Its imports are background work beside an attempt that trains: it makes them at a lower priority (niceness +10),
and takes its priority back once it becomes the driver. A user that may not raise a priority (no CAP_SYS_NICE)
keeps a driver niced; verl's driver mostly waits on Ray (its trainer runs in the ``TaskRunner`` actor), whose
workers the raylet starts, at their own priority.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence

USAGE = "usage: python -m verl_hooks.standby MODULE   (then one JSON line on stdin: argv, cwd)"
NICENESS = 10
"""How far below the attempt's processes a waiting standby's imports run."""


def top_level_imports(module: str) -> list[str]:
    """The modules ``module``'s source imports outside any function, in order (relative ones resolved)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    with open(spec.origin, encoding="utf-8") as source:
        tree = ast.parse(source.read(), spec.origin)
    package = module if spec.submodule_search_locations else module.rpartition(".")[0]
    names: list[str] = []
    for node in _module_level(tree.body):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]  # submodules; attributes fail and are skipped
    return [name for name in dict.fromkeys(names) if name and not name.startswith("__future__")]


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements that run at import: the body, and what ``if``/``try`` blocks at its level hold."""
    found: list[ast.stmt] = []
    for node in body:
        found.append(node)
        if isinstance(node, ast.If):
            found += _module_level(node.body) + _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            found += _module_level(node.body) + _module_level(node.orelse) + _module_level(node.finalbody)
    return found


def preload(module: str) -> list[str]:
    """Import the launcher and what ``module`` imports; the names imported. One that fails is left for the job
    itself to fail on, with its own traceback, when it runs."""
    loaded = []
    for name in ["verl_hooks.launch", *top_level_imports(module)]:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the job reports it when it runs
            continue
        loaded.append(name)
    return loaded


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    started = time.monotonic()
    priority = os.getpriority(os.PRIO_PROCESS, 0)
    _set_priority(min(19, priority + NICENESS))
    loaded = preload(args[0])
    # Into the attempt's stderr.log, once it is launched: what the relaunch did not have to import.
    print(
        f"verl_hooks.standby: ready, {len(loaded)} modules imported in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # discarded before it was needed
    command = json.loads(line)
    try:
        _set_priority(priority)
    except PermissionError:
        print(f"verl_hooks.standby: the driver keeps niceness +{NICENESS} (not allowed to raise it)", file=sys.stderr)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # as a cold launch's driver has it
    os.close(devnull)
    if command.get("cwd"):
        os.chdir(command["cwd"])
    from verl_hooks.launch import main as launch

    launch(command["argv"])  # never returns
    return 0


def _set_priority(niceness: int) -> None:
    """Every thread's: on Linux a niceness is a thread's, and a thread started during the imports has its own."""
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
        try:
            os.setpriority(os.PRIO_PROCESS, int(task), niceness)
        except ProcessLookupError:
            continue  # a thread that ended meanwhile


if __name__ == "__main__":
    sys.exit(main())
