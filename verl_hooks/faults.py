"""Fault injection into the real phases of a weight sync, for tests and for chaos runs of real jobs.

``VERL_HOOKS_FAULTS`` holds comma-separated specs ``PHASE:ACTION[@STEP][#ATTEMPT]``:
``update_weights:raise@3#1`` raises inside the update phase of the sync at global step 3, on attempt 1 only
(the attempt comes from ``VERL_SUPERVISOR_ATTEMPT``), so that the restarted job passes. Without ``@STEP`` a
spec matches any step; without ``#ATTEMPT`` it matches every attempt. Each spec fires at most once per process;
with ``VERL_HOOKS_FAULT_LEDGER`` naming a file, at most once per run: a spec recorded there as fired is not fired
again by any process, whichever attempt reaches its step (a stream of failures at global steps, replayed the same
under launchers that resume from different checkpoints).

A fault fires when its phase is entered, after every earlier phase has really run, so the rollout is left in
the state a real failure at that point would leave. Outside the sync, ``generate``, ``reward`` and ``train``
(``StepPoint``) fire in the trainer's step, and ``emergency_save`` (``SavePoint``) inside the emergency save.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from enum import Enum

from verl_hooks.errors import HookSettingsError, InjectedFault
from verl_hooks.phases import SyncPhase

logger = logging.getLogger(__name__)


class FaultAction(str, Enum):
    RAISE = "raise"
    """Raise ``InjectedFault``, as a failing remote call would."""
    HANG = "hang"
    """Block forever: an awaited phase awaits a future that never completes (cancellable, like an awaited
    ObjectRef); a blocking phase blocks its thread (not cancellable, like a ``ray.get`` that never returns)."""
    EXIT = "exit"
    """The process dies at once (SIGKILL to itself), as on an OOM kill or a segfault."""
    ORPHAN = "orphan"
    """Start a helper that sheds the run's marker and its parent (a fresh environment, a session of its own, a
    parent that exits at once: what some libraries' launch scripts do), then go on; the sync is not failed. The
    helper appends its pid to the fault log, and sleeps: whatever ends it is the supervisor's doing."""
    STRAND = "strand"
    """In a phase that starts trainer tasks (naive, build_process_group, update_weights, finalize): start them,
    then raise without starting the rollout's side, as a rollout that never joins leaves the trainer's ranks
    blocked (in build_process_group: once the trainer's ``init_process_group`` tasks are started, which wait in
    the group's rendezvous). Elsewhere (and in ``emergency_save``) a raise."""


class SavePoint(str, Enum):
    """Where a fault can fire outside the weight sync."""

    EMERGENCY_SAVE = "emergency_save"
    """Inside the trainer's emergency save, once the actor's part is written (``raise``: the save fails;
    ``hang``: it runs past its deadline; ``exit``: the trainer process dies half-way)."""


class StepPoint(str, Enum):
    """Where a fault can fire in the trainer's step, outside the weight sync (``verl_hooks.trainers`` fires them
    around verl's own trainer methods of those names)."""

    GENERATE = "generate"
    """Step N's generation: ``raise`` on the trainer's side of the call (V1 ``_submit_batch_to_rollout``, legacy
    ``_get_gen_batch``: once the batch is drawn), ``exit`` SIGKILLs the process of a rollout replica's first server
    as the generation starts, ``hang`` blocks the trainer there."""
    REWARD = "reward"
    """Step N's reward computation (``_compute_reward_colocate``): ``raise``, ``hang``, or ``exit`` (the trainer's
    process dies, as a reward function that crashes its interpreter)."""
    TRAIN = "train"
    """A trainer worker's task of step N, the actor update (``_update_actor``): ``raise`` runs the update on the
    workers, then raises as a rank's failure reaches the trainer; ``exit`` SIGKILLs the process of the trainer's
    rank-0 worker before the update; ``hang`` blocks the trainer there."""


_SPEC_RE = re.compile(r"^(?P<phase>[a-z_]+):(?P<action>[a-z]+)(?:@(?P<step>\d+))?(?:#(?P<attempt>\d+))?$")
_INJECTABLE_PHASES: tuple[SyncPhase | SavePoint | StepPoint, ...] = (
    *(p for p in SyncPhase if p is not SyncPhase.UNKNOWN),
    *SavePoint,
    *StepPoint,
)


@dataclass(frozen=True)
class FaultSpec:
    phase: SyncPhase | SavePoint | StepPoint
    action: FaultAction
    step: int | None = None
    attempt: int | None = None

    def matches(self, phase: SyncPhase | SavePoint | StepPoint, step: int | None, attempt: int) -> bool:
        return (
            self.phase is phase
            and (self.step is None or self.step == step)
            and (self.attempt is None or self.attempt == attempt)
        )

    def __str__(self) -> str:
        text = f"{self.phase.value}:{self.action.value}"
        if self.step is not None:
            text += f"@{self.step}"
        if self.attempt is not None:
            text += f"#{self.attempt}"
        return text


def parse_fault_specs(text: str | None) -> tuple[FaultSpec, ...]:
    """Parse ``VERL_HOOKS_FAULTS``; an empty or missing value means no faults. Raises ``HookSettingsError``."""
    if not text or not text.strip():
        return ()
    specs = []
    for raw in text.split(","):
        item = raw.strip()
        match = _SPEC_RE.match(item)
        if not match:
            raise HookSettingsError(
                f"VERL_HOOKS_FAULTS: cannot parse {item!r}; expected PHASE:ACTION[@STEP][#ATTEMPT], "
                f"e.g. update_weights:raise@3#1"
            )
        phase = next((p for p in _INJECTABLE_PHASES if p.value == match["phase"]), None)
        if phase not in _INJECTABLE_PHASES:
            names = ", ".join(p.value for p in _INJECTABLE_PHASES)
            raise HookSettingsError(f"VERL_HOOKS_FAULTS: unknown phase {match['phase']!r} in {item!r}; phases: {names}")
        try:
            action = FaultAction(match["action"])
        except ValueError:
            names = ", ".join(a.value for a in FaultAction)
            raise HookSettingsError(
                f"VERL_HOOKS_FAULTS: unknown action {match['action']!r} in {item!r}; actions: {names}"
            ) from None
        attempt = int(match["attempt"]) if match["attempt"] else None
        if attempt == 0:
            raise HookSettingsError(f"VERL_HOOKS_FAULTS: attempts are numbered from 1, got #0 in {item!r}")
        specs.append(FaultSpec(phase, action, int(match["step"]) if match["step"] else None, attempt))
    return tuple(specs)


class FaultPlan:
    """The faults this process should inject, each fired at most once (with a ledger, once per run)."""

    def __init__(
        self,
        specs: tuple[FaultSpec, ...],
        attempt: int,
        log_path: str | None = None,
        ledger_path: str | None = None,
    ) -> None:
        self.specs = specs
        self.attempt = attempt
        self.log_path = log_path
        self.ledger_path = ledger_path
        self._fired: set[FaultSpec] = set()
        self._lock = threading.Lock()

    def take(self, phase: SyncPhase | SavePoint | StepPoint, step: int | None) -> FaultSpec | None:
        """The fault to fire on entering ``phase`` at ``step``, marking it fired."""
        with self._lock:
            for spec in self.specs:
                if spec in self._fired or not spec.matches(phase, step, self.attempt):
                    continue
                self._fired.add(spec)
                if self.ledger_path and not claim_in_ledger(self.ledger_path, spec, step, self.attempt):
                    continue
                self._log(spec, step)
                return spec
        return None

    def _log(self, spec: FaultSpec, step: int | None) -> None:
        if self.log_path:
            entry = {"ts": time.time(), "spec": str(spec), "step": step, "attempt": self.attempt, "pid": os.getpid()}
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")


def claim_in_ledger(path: str, spec: FaultSpec, step: int | None, attempt: int) -> bool:
    """Record ``spec`` as fired in the run's ledger unless a process recorded it before; True: fire it now.

    The line is on disk (fsync) before the fault fires, because ``exit`` SIGKILLs this process at once and the
    next attempt must not fire it again. An exclusive lock makes the check and the record one step for every
    process of the run. A ledger that cannot be written fires nothing: firing without a record would fire the
    fault again in every attempt that reaches its step."""
    try:
        with open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.seek(0)
                if str(spec) in {json.loads(line)["spec"] for line in f if line.strip()}:
                    return False
                entry = {"ts": time.time(), "spec": str(spec), "step": step, "attempt": attempt, "pid": os.getpid()}
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())
                return True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("verl_hooks: injected fault %s not fired: its ledger %s is unusable (%s)", spec, path, exc)
        return False


# Injected hangs wait on this event so that a test can release the threads it left blocked; in a real job
# nothing sets it and the hang lasts until the process is torn down.
_release_hangs = threading.Event()


def release_injected_hangs() -> None:
    """Unblock every injected hang in this process (for tests, which must not leak blocked threads)."""
    _release_hangs.set()


def rearm_injected_hangs() -> None:
    _release_hangs.clear()


def _message(spec: FaultSpec, step: int | None) -> str:
    return f"injected fault {spec} (VERL_HOOKS_FAULTS) fired at global step {step}"


def fire_blocking(spec: FaultSpec, step: int | None) -> None:
    """Carry out ``spec`` in a phase that blocks its thread (the ones verl runs with ``ray.get``)."""
    if spec.action is FaultAction.ORPHAN:
        orphan_a_helper()
        return
    if spec.action in (FaultAction.RAISE, FaultAction.STRAND):
        raise InjectedFault(_message(spec, step))
    if spec.action is FaultAction.EXIT:
        _die()
    _release_hangs.wait()
    raise InjectedFault(_message(spec, step) + " (hang released by the test)")


async def fire_awaited(spec: FaultSpec, step: int | None) -> None:
    """Carry out ``spec`` in a phase that verl awaits (the replica calls)."""
    if spec.action is FaultAction.ORPHAN:
        orphan_a_helper()
        return
    if spec.action in (FaultAction.RAISE, FaultAction.STRAND):
        raise InjectedFault(_message(spec, step))
    if spec.action is FaultAction.EXIT:
        _die()
    while not _release_hangs.is_set():
        # Polling keeps the hang releasable from another thread; each sleep is a cancellation point, as an
        # awaited ObjectRef would be.
        await asyncio.sleep(0.05)
    raise InjectedFault(_message(spec, step) + " (hang released by the test)")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


_ORPHAN = r"""
import json, os, sys, time
if os.fork() == 0:
    os.setsid()
    if sys.argv[1]:
        with open(sys.argv[1], "a") as log:
            log.write(json.dumps({"ts": time.time(), "orphan_pid": os.getpid()}) + "\n")
    time.sleep(3600)
os._exit(0)
"""


def orphan_a_helper() -> None:
    """The ``orphan`` action: its intermediate process exits at once, leaving the helper nobody's child."""
    from verl_hooks.settings import fault_log  # here: settings imports this module

    fresh = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # the helper's own environment, not one we read
    log = fault_log() or ""
    subprocess.run([sys.executable, "-c", _ORPHAN, log], env=fresh, start_new_session=True, check=False)
