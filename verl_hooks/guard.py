"""The guard around verl's ``CheckpointEngineManager.update_weights``.

verl's own ``update_weights`` body runs unchanged, with a thin view of the manager standing in for ``self``:
the view forwards everything to the real manager and notes each phase as it is entered (and fires an injected
fault there, if one is planned). The body runs on an event loop of its own, in a daemon thread, because verl
blocks in ``ray.get`` in several phases: on the caller's loop such a block would also block the deadline. On
its own thread it blocks only itself; the caller's loop stays free to enforce the deadline, to run the bounded
cleanup (awaiting ObjectRefs, never ``ray.get``) and to raise ``WeightSyncFatalError``. A thread stuck in a
call that cannot be cancelled is abandoned; the supervisor's teardown ends the process.

The view also notes every task the sync (and its cleanup) starts on the trainer's worker group, so that after a
failure the guard can say whether the trainer side is idle (``verl_hooks.trainer_side``): the fact the trainer's
emergency save of the step stands on (``verl_hooks.emergency``). After a sync that succeeded, a stop the
supervisor asked for (``restart.save_on_stop_s``) is raised as ``StopRequested``: the safe point to save at.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from verl_hooks import emergency, heartbeat, step_progress, sync_verdict, trainer_side
from verl_hooks.compat import VERL_MANAGER_MODULE
from verl_hooks.contract import HeartbeatKind, JobExitCode, RecordSource
from verl_hooks.deadline import SyncDeadlines
from verl_hooks.errors import (
    CleanupOutcome,
    CleanupStatus,
    StopRequested,
    WeightSyncFatalError,
    WeightSyncTimeout,
)
from verl_hooks.faults import FaultAction, FaultPlan, FaultSpec, fire_awaited, fire_blocking
from verl_hooks.phases import CleanupStep, SyncPhase, plan_cleanup
from verl_hooks.settings import HookSettings
from verl_hooks.sync_verdict import Failed, PassOn, Synced
from verl_hooks.trainer_side import TrainerTasks

if sys.version_info >= (3, 11):
    from typing import assert_never
else:  # Python 3.10
    from typing_extensions import assert_never

logger = logging.getLogger(__name__)

GUARD_MARK = "__verl_hooks_guard__"

# One history of sync durations per manager (verl's separate_async trainer has two); weakly held, so that a
# manager's end ends its history.
_deadlines: weakref.WeakKeyDictionary[Any, SyncDeadlines] = weakref.WeakKeyDictionary()


def deadlines_for(manager: Any, settings: HookSettings) -> SyncDeadlines:
    """The manager's deadlines; new ones (an empty history) when the settings that shape them changed."""
    wanted = SyncDeadlines(
        fixed_s=settings.sync_timeout_s,
        adaptive=settings.sync_adaptive,
        multiple=settings.sync_adaptive_multiple,
        floor_s=settings.sync_adaptive_floor_s,
        verl_init_timeout_s=settings.verl_init_timeout_s,
    )
    deadlines = _deadlines.get(manager)
    if deadlines is None or deadlines.shape != wanted.shape:
        _deadlines[manager] = deadlines = wanted
    return deadlines


@dataclass
class PhaseTracker:
    """What one sync got through: phases entered, phases known to have finished, the rollout group it built."""

    entered: list[SyncPhase] = field(default_factory=list)
    completed: set[SyncPhase] = field(default_factory=set)
    rollout_wg: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def current(self) -> SyncPhase:
        return self.entered[-1] if self.entered else SyncPhase.UNKNOWN

    def enter(self, phase: SyncPhase) -> None:
        with self._lock:
            # verl runs phases strictly in sequence: entering one means the previous one returned.
            if self.entered:
                self.completed.add(self.entered[-1])
            self.entered.append(phase)

    def complete(self, phase: SyncPhase) -> None:
        with self._lock:
            self.completed.add(phase)

    def complete_all(self) -> None:
        with self._lock:
            self.completed.update(self.entered)


@dataclass
class _SyncContext:
    tracker: PhaseTracker
    faults: FaultPlan
    global_step: int | None
    backend: str
    trainer_tasks: TrainerTasks = field(default_factory=TrainerTasks)
    """Every trainer-side task the sync started, for the judgement of whether the trainer side is idle."""
    strand_at_group_init: FaultSpec | None = None
    """A ``strand`` fault of build_process_group: fires once the trainer's init_process_group tasks are started."""
    abandoned: threading.Event = field(default_factory=threading.Event)
    """Set when the guard gives up on the sync: its thread, if it ever wakes up, starts no further phase."""

    def refuse_if_abandoned(self, what: str) -> None:
        if self.abandoned.is_set():
            # A blocked ray.get that returns after the deadline must not go on: to push weights into a rollout
            # that the cleanup has already resumed, or to start trainer tasks beside the emergency save.
            raise WeightSyncTimeout(f"the guard abandoned this weight sync; {what} not started")

    def enter(self, phase: SyncPhase) -> FaultSpec | None:
        """Note that the sync entered ``phase``; the fault planned there, if any, for the caller to fire."""
        self.refuse_if_abandoned(f"phase '{phase.value}'")
        self.tracker.enter(phase)
        heartbeat.beat(HeartbeatKind.SYNC_PHASE, step=self.global_step, phase=phase.value)
        return self.faults.take(phase, self.global_step)

    def enter_blocking(self, phase: SyncPhase) -> None:
        fault = self.enter(phase)
        if fault is not None:
            fire_blocking(fault, self.global_step)

    def submit_trainer_tasks(self, phase: SyncPhase, submit: Callable[[], Any]) -> Any:
        """Enter ``phase`` and start its trainer tasks (noted); a ``strand`` fault fires once they are started."""
        fault = self.enter(phase)
        if fault is not None and fault.action is not FaultAction.STRAND:
            fire_blocking(fault, self.global_step)
        refs = self.trainer_tasks.note(submit())
        if fault is not None and fault.action is FaultAction.STRAND:
            fire_blocking(fault, self.global_step)
        return refs

    async def run_awaited(self, phase: SyncPhase, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        fault = self.enter(phase)
        if fault is not None:
            await fire_awaited(fault, self.global_step)
        # verl's auto_await returns a coroutine only when its caller's frame is a coroutine's: call it from here.
        result = await method(*args, **kwargs)
        self.tracker.complete(phase)
        return result


class _ActorGroupView:
    """Stands in for ``manager.actor_wg`` inside the sync: the calls that start the update and finalize phases
    (and the whole naive sync) go through it."""

    def __init__(self, worker_group: Any, sync: _SyncContext) -> None:
        self._wg = worker_group
        self._sync = sync

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wg, name)

    def update_weights(self, *args: Any, **kwargs: Any) -> Any:
        phase = SyncPhase.NAIVE if self._sync.backend == "naive" else SyncPhase.UPDATE_WEIGHTS
        return self._sync.submit_trainer_tasks(phase, lambda: self._wg.update_weights(*args, **kwargs))

    def execute_checkpoint_engine(self, *args: Any, **kwargs: Any) -> Any:
        methods = args[0] if args else kwargs.get("method")
        if methods and methods[0] == "finalize":
            return self._sync.submit_trainer_tasks(
                SyncPhase.FINALIZE, lambda: self._wg.execute_checkpoint_engine(*args, **kwargs)
            )
        # prepare and init_process_group, from verl's build_process_group run over this view. A prepare that
        # returns after the guard gave up must not start init_process_group beside the emergency save.
        self._sync.refuse_if_abandoned(f"execute_checkpoint_engine({methods[0] if methods else '?'})")
        refs = self._sync.trainer_tasks.note(self._wg.execute_checkpoint_engine(*args, **kwargs))
        strand = self._sync.strand_at_group_init
        if strand is not None and methods and methods[0] == "init_process_group":
            self._sync.strand_at_group_init = None
            fire_blocking(strand, self._sync.global_step)  # the trainer's ranks now wait for a rollout that won't come
        return refs


class _ManagerView:
    """Stands in for ``self`` inside verl's ``update_weights``; forwards everything to the real manager."""

    def __init__(self, manager: Any, sync: _SyncContext) -> None:
        object.__setattr__(self, "_manager", manager)
        object.__setattr__(self, "_sync", sync)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._manager, name, value)

    @property
    def actor_wg(self) -> _ActorGroupView:
        return _ActorGroupView(self._manager.actor_wg, self._sync)

    async def abort_replicas(self, *args: Any, **kwargs: Any) -> Any:
        return await self._sync.run_awaited(SyncPhase.ABORT, self._manager.abort_replicas, *args, **kwargs)

    async def release_kv_cache_replicas(self) -> Any:
        return await self._sync.run_awaited(SyncPhase.RELEASE_KV_CACHE, self._manager.release_kv_cache_replicas)

    async def resume_kv_cache_replicas(self) -> Any:
        return await self._sync.run_awaited(SyncPhase.RESUME_KV_CACHE, self._manager.resume_kv_cache_replicas)

    async def resume_generation_replicas(self) -> Any:
        return await self._sync.run_awaited(SyncPhase.RESUME_GENERATION, self._manager.resume_generation_replicas)

    def build_process_group(self, rollout: Any) -> Any:
        # Cleanup needs the rollout worker group verl builds for this sync, to finalize its engines.
        self._sync.tracker.rollout_wg = rollout
        method = type(self._manager).build_process_group
        verls_own = getattr(method, "__module__", None) == VERL_MANAGER_MODULE
        fault = self._sync.enter(SyncPhase.BUILD_PROCESS_GROUP)
        if fault is not None and fault.action is FaultAction.STRAND and verls_own:
            self._sync.strand_at_group_init = fault
        elif fault is not None:
            fire_blocking(fault, self._sync.global_step)
        if verls_own:
            # verl's own (verl/checkpoint_engine/base.py:422), run over this view so that its prepare and
            # init_process_group tasks on the trainer side are seen (an override may call super() and needs self).
            result = method(self, rollout)
        else:
            self._sync.trainer_tasks.opaque(SyncPhase.BUILD_PROCESS_GROUP.value)
            result = self._manager.build_process_group(rollout)
        self._sync.tracker.complete(SyncPhase.BUILD_PROCESS_GROUP)
        return result


class _SyncThread:
    """Runs one coroutine on an event loop of its own, in a daemon thread that may be abandoned if it hangs."""

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._coro = coro
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._cancel_requested = False
        self._thread = threading.Thread(target=self._run, name="verl-hooks-weight-sync", daemon=True)

    def start(self) -> None:
        self.future.set_running_or_notify_cancel()
        self._thread.start()

    def _run(self) -> None:
        try:
            result = asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting guard, which decides
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)

    async def _main(self) -> Any:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
            cancel_now = self._cancel_requested
        if cancel_now:
            self._coro.close()
            raise asyncio.CancelledError
        return await self._coro

    def cancel(self) -> None:
        """Cancel the coroutine at its next await. A thread blocked in ``ray.get`` is not reached by this."""
        with self._lock:
            self._cancel_requested = True
            if self._loop is not None and self._task is not None:
                self._loop.call_soon_threadsafe(self._task.cancel)

    def stack(self) -> str | None:
        """Where the sync is right now: the thread's stack (a blocking call shows there) and the chain of
        coroutines it is awaiting through (an awaited hang shows only there: the thread sits in the loop)."""
        parts = []
        frame = sys._current_frames().get(self._thread.ident) if self._thread.ident else None
        if frame is not None:
            parts.append("Thread stack (most recent call last):\n" + "".join(traceback.format_stack(frame)))
        task = self._task
        if task is not None and not task.done():
            parts.append("Awaiting (outermost first):\n" + _await_chain(task.get_coro()))
        return "\n".join(parts) or None


def _await_chain(coro: Any) -> str:
    lines = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            break
        code = frame.f_code
        lines.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n')
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return "".join(lines)


async def _finalize_engines(manager: Any, rollout_wg: Any, tasks: TrainerTasks) -> None:
    actor_wg = manager.actor_wg
    refs = list(tasks.note(actor_wg.execute_checkpoint_engine(["finalize"] * actor_wg.world_size)))
    if rollout_wg is not None:
        refs += rollout_wg.execute_checkpoint_engine(["finalize"] * rollout_wg.world_size)
    await asyncio.gather(*refs)


async def _resume_kv_cache(manager: Any, _rollout_wg: Any, _tasks: TrainerTasks) -> None:
    await manager.resume_kv_cache_replicas()


async def _resume_generation(manager: Any, _rollout_wg: Any, _tasks: TrainerTasks) -> None:
    await manager.resume_generation_replicas()


async def _wake_up(manager: Any, _rollout_wg: Any, _tasks: TrainerTasks) -> None:
    await manager.wake_up_replicas()


_CLEANUP_ACTIONS: dict[CleanupStep, Callable[[Any, Any, TrainerTasks], Awaitable[None]]] = {
    CleanupStep.FINALIZE_ENGINES: _finalize_engines,
    CleanupStep.RESUME_KV_CACHE: _resume_kv_cache,
    CleanupStep.RESUME_GENERATION: _resume_generation,
    CleanupStep.WAKE_UP: _wake_up,
}


async def run_cleanup(
    steps: list[CleanupStep],
    manager: Any,
    rollout_wg: Any,
    step_timeout_s: float,
    trainer_tasks: TrainerTasks | None = None,
) -> list[CleanupOutcome]:
    """Run each step against the real manager, each bounded by ``step_timeout_s``; never raises. The trainer
    tasks it starts are noted in ``trainer_tasks``."""
    tasks = trainer_tasks if trainer_tasks is not None else TrainerTasks()
    outcomes = []
    for step in steps:
        started = time.monotonic()
        task = asyncio.ensure_future(_CLEANUP_ACTIONS[step](manager, rollout_wg, tasks))
        done, _ = await asyncio.wait({task}, timeout=step_timeout_s)
        elapsed = time.monotonic() - started
        if not done:
            task.cancel()
            outcome = CleanupOutcome(
                step.value, CleanupStatus.TIMED_OUT, elapsed, f"did not finish within {step_timeout_s:g} s"
            )
        elif task.exception() is not None:
            exc = task.exception()
            outcome = CleanupOutcome(step.value, CleanupStatus.FAILED, elapsed, f"{type(exc).__name__}: {exc}")
        else:
            outcome = CleanupOutcome(step.value, CleanupStatus.OK, elapsed)
        if outcome.status is CleanupStatus.OK:
            logger.info("weight-sync cleanup %s: ok", step.value)
        else:
            logger.warning("weight-sync cleanup %s: %s (%s)", step.value, outcome.status.value, outcome.message)
        outcomes.append(outcome)
    return outcomes


class _Backstop:
    """Last resort: if the guard has not raised long after the deadline, record the failure and exit 75.

    The guard's own path always ends within the deadline plus the cleanup budget; this only fires if something
    outside it (the caller's event loop blocked, the interpreter wedged) keeps it from raising.
    """

    def __init__(self, delay_s: float, describe: Callable[[], WeightSyncFatalError], error_file: str | None) -> None:
        self._describe = describe
        self._error_file = error_file
        self._timer = threading.Timer(delay_s, self._fire) if delay_s > 0 else None
        if self._timer is not None:
            self._timer.daemon = True

    def start(self) -> None:
        if self._timer is not None:
            self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _fire(self) -> None:
        try:
            self._record()
        finally:
            # Whatever recording did, the process must end: this is the last line of defence against a hang.
            os._exit(JobExitCode.WEIGHT_SYNC_FATAL)

    def _record(self) -> None:
        from verl_hooks.contract import write_record
        from verl_hooks.record import record_for_weight_sync_error

        fatal = self._describe()
        print(f"verl_hooks: {fatal.message}; the guard could not raise, exiting the process", file=sys.stderr)
        record = record_for_weight_sync_error(
            fatal, exit_code=JobExitCode.WEIGHT_SYNC_FATAL, source=RecordSource.GUARD_BACKSTOP
        )
        if self._error_file:
            try:
                write_record(self._error_file, record)
            except OSError as exc:  # e.g. a worker on a node where the supervisor's run directory is not mounted
                print(f"verl_hooks: could not write the error record {self._error_file}: {exc}", file=sys.stderr)
        heartbeat.send_record(record)
        sys.stderr.flush()


async def _failed(
    manager: Any,
    sync: _SyncContext,
    settings: HookSettings,
    phase: SyncPhase,
    primary: BaseException,
    hang: bool,
    stuck_stack: str | None,
    started: float,
) -> WeightSyncFatalError:
    """After a failed sync (in ``phase``, as the wait ended): the bounded cleanup its phases call for, the trainer
    side observed (for the emergency save), then the typed error that says all of it."""
    steps = plan_cleanup(sync.tracker.entered, sync.tracker.completed)
    outcomes = await run_cleanup(
        steps, manager, sync.tracker.rollout_wg, settings.cleanup_step_timeout_s, sync.trainer_tasks
    )
    side = None
    if settings.emergency_save:
        completed = {p.value for p in sync.tracker.completed}
        side = await trainer_side.observe(
            sync.trainer_tasks, completed, getattr(manager, "actor_wg", None), settings.trainer_idle_wait_s
        )
    fatal = WeightSyncFatalError.from_failure(
        primary,
        phase=phase,
        global_step=sync.global_step,
        backend=sync.backend,
        elapsed_s=time.monotonic() - started,
        cleanup=outcomes,
        hang=hang,
        stuck_stack=stuck_stack,
        trainer_side=None if side is None else side.to_dict(),
    )
    logger.error("%s", fatal.message)
    heartbeat.beat(HeartbeatKind.SYNC_FAILED, step=sync.global_step, phase=phase.value, hang=hang)
    return fatal


async def run_guarded_sync(
    manager: Any,
    original: Callable[..., Coroutine[Any, Any, Any]],
    global_steps: int | None,
    settings: HookSettings,
    faults: FaultPlan,
    *,
    through_view: bool = True,
) -> Any:
    """Run verl's ``update_weights`` body for ``manager`` under the deadline; on failure clean up and raise.

    ``through_view``: verl's own body gets a view of the manager that notes each phase it enters; a body of the
    user's own (a subclass's override) gets the manager itself, so that ``super()`` and ``isinstance`` hold in it.
    """
    sync = _SyncContext(PhaseTracker(), faults, global_steps, str(manager.backend))
    deadlines = deadlines_for(manager, settings)
    deadline = deadlines.current()
    started = time.monotonic()
    runner = _SyncThread(original(_ManagerView(manager, sync) if through_view else manager, global_steps))

    def describe_hang() -> WeightSyncFatalError:
        return WeightSyncFatalError.from_failure(
            WeightSyncTimeout("the guard did not finish its cleanup in time"),
            phase=sync.tracker.current,
            global_step=global_steps,
            backend=sync.backend,
            elapsed_s=time.monotonic() - started,
            cleanup=[],
            hang=True,
            stuck_stack=runner.stack(),
        )

    backstop_delay = deadline.seconds + settings.cleanup_budget_s + settings.hard_exit_grace_s
    backstop = _Backstop(backstop_delay if settings.hard_exit_grace_s > 0 else 0, describe_hang, settings.error_file)
    waiter = asyncio.wrap_future(runner.future)
    backstop.start()
    heartbeat.beat(HeartbeatKind.SYNC_BEGIN, step=global_steps, backend=sync.backend)
    try:
        runner.start()
        done, _ = await asyncio.wait({waiter}, timeout=deadline.seconds)
        finished, phase = bool(done), sync.tracker.current
        verdict = sync_verdict.judge(finished, waiter.exception() if finished else None, deadline, phase)
        match verdict:
            case Synced():
                sync.tracker.complete_all()
                duration_s = time.monotonic() - started
                deadlines.record(duration_s)
                heartbeat.beat(HeartbeatKind.SYNC_END, step=global_steps, duration_s=duration_s)
                step_progress.note_synced(global_steps)
                if sync_verdict.stop_here(heartbeat.save_requested(), emergency.a_trainer_can_save()):
                    raise StopRequested(
                        f"the supervisor asked the job to stop; the weight sync of step {global_steps} is done",
                        global_step=global_steps,
                    )
                return waiter.result()
            case PassOn(error):
                raise error
            case Failed(primary, hang):
                stuck_stack = None
                if hang:
                    stuck_stack = runner.stack()
                    sync.abandoned.set()
                    runner.cancel()
                    await asyncio.wait({waiter}, timeout=settings.cancel_grace_s)
                    if waiter.done() and not waiter.cancelled():
                        waiter.exception()  # retrieved so asyncio does not warn; the deadline is the failure
                raise await _failed(manager, sync, settings, phase, primary, hang, stuck_stack, started) from primary
            case _:
                assert_never(verdict)
    except asyncio.CancelledError:
        runner.cancel()
        raise
    finally:
        backstop.cancel()
