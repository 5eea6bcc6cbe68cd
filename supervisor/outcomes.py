"""The values decisions are made of and end in: how a job's process ended, what to do about an attempt, why the
supervisor stopped. Plain values shared by policy, the loop and the mechanisms."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from enum import Enum, IntEnum


class Action(str, Enum):
    """What to do about an attempt that ended. (Members are lowercase: OmegaConf matches YAML by name.)"""

    done = "done"
    restart = "restart"
    fail = "fail"


class SupervisorRule(str, Enum):
    """Why an attempt ended when no classification rule of ``conf/`` judged it: the supervisor's own verdicts.
    They are recorded as the attempt's ``rule``, next to the names of the configured rules, which may not take
    them (``config.validate``); in memory they are members, compared by identity, never as strings."""

    DEFAULT = "default"
    """No configured rule matched: ``default_action``."""
    CLEAN_EXIT = "clean-exit"
    """No configured rule matched a driver that exited 0 on its own with no error record: the job finished.
    ``default_action`` never restarts a job that says it is done (rules that replace the built-in ones may
    leave exit 0 out)."""
    SUPERVISOR_RESTARTED = "supervisor-restarted"
    """The supervisor died while the attempt ran; a new one found it in state.json."""
    INTERRUPTED = "interrupted"
    """The supervisor was stopped (SIGINT, SIGTERM) while the attempt ran."""
    PREEMPTED = "preempted"
    """Ray drained a node the attempt held (a preemption notice): it saved what it could and was relaunched on
    the nodes that remain, not counted against the restart budget (``supervisor/policy/preemption.py``)."""
    SUPERVISOR_ERROR = "supervisor-error"
    """A bug in the supervisor ended the run while the attempt ran."""
    RESUME_MISMATCH = "resume-mismatch"
    """The attempt did not resume from the checkpoint the supervisor chose (its weight syncs said so)."""
    DISK_FULL = "disk-full"
    """The attempt found no room to write, and the checkpoint volume has less free than the next save needs."""

    def __str__(self) -> str:
        return self.value  # as recorded, in messages too

    @classmethod
    def parse(cls, name: str) -> SupervisorRule | str:
        """A rule's name as recorded: the verdict it names, or a configured rule's name."""
        return cls(name) if name in cls._value2member_map_ else name


RuleName = str
"""The name of a classification rule of ``conf/`` (``rules[].name``)."""


class ExitCode(IntEnum):
    """The supervisor's exit codes (docs/reference/exit-codes.md is generated from them)."""

    DONE = 0
    """The job finished."""
    INTERNAL_ERROR = 1
    """A bug in the supervisor itself: the traceback is printed and the job was torn down."""
    USAGE = 2
    """A bad command line or configuration, or the run directory is in use or already finished: nothing ran."""
    JOB_FAILED = 3
    """The job failed in a way a restart cannot fix: its rules say so (e.g. a configuration error); or the
    checkpoint disk is full (rule ``disk-full``: the message names the volume, the folder, the free space and what
    incomplete steps hold there); or the same failure repeated at the same step from the same checkpoint (outcome
    ``repeated_failure``)."""
    BUDGET_EXHAUSTED = 4
    """The job kept failing and the restart budget (``restart.max_restarts``) is spent."""
    CRASH_LOOP = 5
    """Failed attempts in a row without the checkpoint step advancing (outcome ``crash_loop``), or no valid
    checkpoint to resume from although the run had one (outcome ``no_valid_checkpoint``)."""
    ENVIRONMENT_FAILURE = 6
    """The Ray cluster could not be started or reached, or an attempt could not be fenced off (something of it is
    still alive)."""
    UNKNOWN_CHECKPOINT_LAYOUT = 7
    """A checkpoint newer than any complete one is in a layout the supervisor cannot judge: nothing was resumed
    from, set aside or removed."""
    RESUME_NOT_HONOURED = 8
    """A relaunched attempt did not resume from the checkpoint the supervisor chose: it was stopped at its first
    weight sync."""
    NO_HEALTHY_CAPACITY = 9
    """Unhealthy hardware and no capacity left: the embedded cluster's one machine has an unhealthy GPU, or the
    nodes left once the unhealthy ones were drained cannot hold what the job reserved (the message names the nodes
    taken out and what is short)."""
    INTERRUPTED_SIGINT = 130
    """Interrupted by SIGINT: the job was torn down and the run is ``stopped``; started again on its run
    directory, the supervisor continues it."""
    INTERRUPTED_SIGTERM = 143
    """Interrupted by SIGTERM (after the save ``restart.save_on_stop_s`` allows): the job was torn down and the
    run is ``stopped``; started again on its run directory, the supervisor continues it."""

    @property
    def short(self) -> str:
        """A few words for the command line's help."""
        return _SHORT[self]

    @property
    def outcome(self) -> str:
        """The run's outcome as state.json and the run_finished event name it."""
        return "done" if self is ExitCode.DONE else self.name.lower()


INTERRUPTED_EXIT_CODES = frozenset({ExitCode.INTERRUPTED_SIGINT, ExitCode.INTERRUPTED_SIGTERM})
"""The exit codes of a supervisor stopped by a signal."""

RESUMABLE_EXIT_CODES = INTERRUPTED_EXIT_CODES | {ExitCode.NO_HEALTHY_CAPACITY}
"""A run that ended with one of these is stopped, not finished: started again, the supervisor continues it (after
a stop signal; after exit 9, once nodes were added or repaired, as its message says)."""

LOST_ATTEMPT_REASON = "the supervisor stopped while this attempt ran"
"""Why an attempt in flight when its supervisor died was judged (rule ``supervisor-restarted``, action restart)."""


class SharedOutcome(str, Enum):
    """The outcomes of an exit code that ends a run in more than one way (state.json and run_finished name the
    run's outcome; an exit code's own is ``ExitCode.outcome``)."""

    NO_VALID_CHECKPOINT = "no_valid_checkpoint"
    """Exit 5: the run had a complete checkpoint and finds none valid."""
    REPEATED_FAILURE = "repeated_failure"
    """Exit 3: the failure repeated itself at the same step from the same checkpoint."""


_SHORT = {
    ExitCode.DONE: "done",
    ExitCode.INTERNAL_ERROR: "supervisor bug",
    ExitCode.USAGE: "usage or config error",
    ExitCode.JOB_FAILED: "non-retryable job failure",
    ExitCode.BUDGET_EXHAUSTED: "restart budget exhausted",
    ExitCode.CRASH_LOOP: "crash loop or no valid checkpoint",
    ExitCode.ENVIRONMENT_FAILURE: "Ray cluster or fence failure",
    ExitCode.UNKNOWN_CHECKPOINT_LAYOUT: "unknown checkpoint layout",
    ExitCode.RESUME_NOT_HONOURED: "resume not honoured",
    ExitCode.NO_HEALTHY_CAPACITY: "unhealthy hardware, no capacity left",
    ExitCode.INTERRUPTED_SIGINT: "interrupted (SIGINT)",
    ExitCode.INTERRUPTED_SIGTERM: "interrupted (SIGTERM)",
}


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: an exit code, or the signal that killed it."""

    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_wait_status(cls, status: int) -> ExitStatus:
        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status))
        return cls(code=os.waitstatus_to_exitcode(status))

    @property
    def signal_name(self) -> str | None:
        if self.signal is None:
            return None
        try:
            return signal.Signals(self.signal).name
        except ValueError:
            return f"SIG{self.signal}"

    def describe(self) -> str:
        return f"killed by {self.signal_name}" if self.signal is not None else f"exit {self.code}"
