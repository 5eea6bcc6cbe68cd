"""A failure that repeats itself: the same error at the same step, from the same starting point.

Two consecutive attempts, the second started from the checkpoint the first left, both failed with the same error
type, in the same phase, with the same message (numbers, addresses and ids aside), at the same global step: the
second ran the same steps from the same state into the same failure. A third would too (an out-of-memory on one
long batch, a NaN, a bug in a reward function); each try costs a start-up and the steps up to it, so the run
stops at once, saying where it repeated. A pure function of the run's history.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from supervisor.run.history import AttemptRecord, RunHistory

# What differs between two reports of the same failure: addresses, ids, pids, ports, times, attempt numbers.
_VARYING = re.compile(r"0x[0-9a-fA-F]+|\b[0-9a-fA-F]{8,}\b|\d+(\.\d+)?")


def normalise(message: str) -> str:
    """The message with its numbers, hex addresses and ids replaced, and its whitespace folded."""
    return " ".join(_VARYING.sub("#", message).split())


@dataclass(frozen=True)
class Failure:
    """What one attempt's failure is recognised by."""

    error_type: str
    phase: str | None
    message: str
    """Normalised (``normalise``)."""
    step: int

    @classmethod
    def of(cls, attempt: AttemptRecord) -> Failure | None:
        """None for an attempt that failed without an error record or a known step: nothing to compare."""
        if not attempt.failed or attempt.error_type is None or attempt.failed_at_step is None:
            return None
        return cls(attempt.error_type, attempt.phase, normalise(attempt.error_message or ""), attempt.failed_at_step)


@dataclass(frozen=True)
class RepeatedFailure:
    first: AttemptRecord
    second: AttemptRecord
    failure: Failure

    def describe(self) -> str:
        failure, first, second = self.failure, self.first, self.second
        where = f"in phase {failure.phase} " if failure.phase else ""
        start = "a fresh start" if second.resumed_from_step is None else f"global_step_{second.resumed_from_step}"
        short_type = failure.error_type.rsplit(".", 1)[-1]
        message = (second.error_message or "").strip().splitlines()[:1]
        return (
            f"the same failure repeated: attempts {first.number} and {second.number} both failed with {short_type} "
            f"{where}at global step {failure.step}"
            + (f" ({message[0][:200]})" if message else "")
            + f", the second after resuming from {start}, where the first left off. A restart would run the same "
            f"steps into it again (records: attempts/{first.number}/error.json, attempts/{second.number}/error.json; "
            f"restart.stop_on_repeated_failure=false keeps restarting)"
        )


def repeated_failure(history: RunHistory) -> RepeatedFailure | None:
    """The last two attempts, when the second repeated the first's failure from where the first left off.

    Attempts a stop signal ended, or that were in flight when a supervisor died, are passed over: they say
    nothing of the job."""
    judged = [a for a in history.attempts if a.ended and not a.interrupted and not a.lost]
    if len(judged) < 2:
        return None
    first, second = judged[-2:]
    failure = Failure.of(second)
    if failure is None or Failure.of(first) != failure:
        return None
    if second.resumed_from_step != first.reached_step or second.made_progress:
        return None  # not the same steps: a checkpoint was set aside in between, or the second got further
    return RepeatedFailure(first, second, failure)
