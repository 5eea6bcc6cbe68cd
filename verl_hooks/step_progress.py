"""How far the trainer got into the step it was working on when something failed: the facts an emergency save
after a failure *outside* the weight sync stands on.

verl's trainers (V1 ``trainer_base.py`` ``fit`` 467-527, legacy ``ray_trainer.py`` ``fit`` 1466-1805) run each step
as: draw the batch, generate, reward, the read-only trainer passes (old log-prob, reference log-prob, values), the
updates (critic, then actor), save when due, sync the step's weights into the rollout. So the step whose weights
were last synced is the last step the trainer *completed*: at that point actor, critic, optimizer, scheduler and
RNG are what a periodic save of that step writes, and the dataloader has yielded exactly that step's batches.

Three marks per trainer, kept here while its ``fit`` runs:
- a **boundary** at each successful sync of the step the trainer is at (``global_steps``), with the dataloader's
  state at that moment: what a save of that step must store even after the next step's batch was drawn;
- each **trainer call** of the step after it (the passes and the updates, by verl's method names), started,
  finished or raised;
- the thread that runs ``fit``, so that the guard, which only knows the manager, can find the trainer whose sync
  it just finished.

``ProgressView`` is the frozen copy the pure decision (``verl_hooks.emergency.decide``) reads.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

logger = logging.getLogger(__name__)


class CallKind(str, Enum):
    PASS = "pass"
    """A read-only pass over the trainer's workers (log-probs, values): it changes no trainer state."""
    UPDATE = "update"
    """An update of the trainer's weights and optimizer (critic or actor)."""


# verl's trainer methods that run trainer tasks, the same names in V1 (trainer_base.py 1634-1866) and the legacy
# trainer (ray_trainer.py 1252-1378); the job's own verl-shaped trainers use them too (mini-PPO does).
TRAINER_CALLS: dict[str, CallKind] = {
    "_compute_old_log_prob": CallKind.PASS,
    "_compute_ref_log_prob": CallKind.PASS,
    "_compute_values": CallKind.PASS,
    "_update_critic": CallKind.UPDATE,
    "_update_actor": CallKind.UPDATE,
}


@dataclass(frozen=True)
class ProgressView:
    """What the trainer did since its last completed (synced) step, frozen for the decision."""

    synced_step: int | None
    """The last step whose weights were synced while ``fit`` ran; None before the first such sync."""
    has_data_state: bool
    """The dataloader's state at that sync was captured (a trainer without ``train_dataloader`` has none)."""
    started: tuple[str, ...] = ()
    """Trainer calls started since that sync, in order."""
    finished: tuple[str, ...] = ()
    raised: tuple[str, ...] = ()
    """Trainer calls that raised since that sync: a worker may be left inside a collective."""
    in_flight: tuple[str, ...] = ()

    def updates(self, names: tuple[str, ...]) -> Counter[str]:
        return Counter(name for name in names if TRAINER_CALLS.get(name) is CallKind.UPDATE)


@dataclass
class StepProgress:
    synced_step: int | None = None
    data_state: Any = None
    has_data_state: bool = False
    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    raised: list[str] = field(default_factory=list)
    in_flight: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def synced(self, step: int, data_state: Any, has_data_state: bool) -> None:
        with self.lock:
            self.synced_step, self.data_state, self.has_data_state = step, data_state, has_data_state
            self.started.clear()
            self.finished.clear()
            self.raised.clear()

    def begin(self, name: str) -> None:
        with self.lock:
            self.started.append(name)
            self.in_flight[name] += 1

    def end(self, name: str, raised: bool) -> None:
        with self.lock:
            self.in_flight[name] -= 1
            (self.raised if raised else self.finished).append(name)

    def view(self) -> ProgressView:
        with self.lock:
            return ProgressView(
                synced_step=self.synced_step,
                has_data_state=self.has_data_state,
                started=tuple(self.started),
                finished=tuple(self.finished),
                raised=tuple(self.raised),
                in_flight=tuple(name for name, count in self.in_flight.items() if count > 0),
            )


_progress: weakref.WeakKeyDictionary[Any, StepProgress] = weakref.WeakKeyDictionary()
_progress_lock = threading.Lock()
_fitting_here = threading.local()


def progress_of(trainer: Any) -> StepProgress | None:
    with _progress_lock, contextlib.suppress(TypeError):
        return _progress.get(trainer)
    return None


@contextlib.contextmanager
def fitting_in_this_thread(trainer: Any) -> Iterator[None]:
    """While ``trainer.fit`` runs on this thread: its progress is kept, and the guard's syncs on this thread
    mark its boundaries. A trainer's progress starts afresh with each ``fit``."""
    with _progress_lock, contextlib.suppress(TypeError):  # a trainer that cannot be weakly referenced: no progress
        _progress[trainer] = StepProgress()
    stack = _fitting_here.__dict__.setdefault("trainers", [])
    stack.append(trainer)
    try:
        yield
    finally:
        stack.pop()


def _data_state(trainer: Any) -> tuple[Any, bool]:
    loader = getattr(trainer, "train_dataloader", None)
    state_dict = getattr(loader, "state_dict", None)
    if not callable(state_dict):
        return None, False
    try:
        # verl's StatefulDataLoader builds a new dict each call, but its values may be live objects: copy.
        return copy.deepcopy(state_dict()), True
    except Exception:
        logger.warning("verl_hooks: could not capture the dataloader's state at a step boundary", exc_info=True)
        return None, False


def note_synced(step: int | None) -> None:
    """A sync of ``step`` succeeded on this thread: the fitting trainer at that step has completed it."""
    if step is None:
        return  # verl's validation syncs carry no step
    for trainer in getattr(_fitting_here, "trainers", ()):
        progress = progress_of(trainer)
        if progress is not None and getattr(trainer, "global_steps", None) == step:
            progress.synced(step, *_data_state(trainer))


@contextlib.contextmanager
def trainer_call(trainer: Any, name: str) -> Iterator[None]:
    """Around one of ``TRAINER_CALLS`` of a fitting trainer: noted as started, then finished or raised."""
    progress = progress_of(trainer)
    if progress is None:
        yield
        return
    progress.begin(name)
    try:
        yield
    except BaseException:
        progress.end(name, raised=True)
        raise
    progress.end(name, raised=False)


def synced_data_state(trainer: Any) -> Any:
    progress = progress_of(trainer)
    return None if progress is None else progress.data_state


def view_of(trainer: Any) -> ProgressView | None:
    progress = progress_of(trainer)
    return None if progress is None else progress.view()


TRACKED_MARK = "__verl_hooks_tracked__"


def is_tracked(method: Any) -> bool:
    """``method`` is one of ``TRAINER_CALLS`` wrapped by the trainer hook (its calls are noted)."""
    return bool(getattr(method, TRACKED_MARK, False))
