"""Which drains Ray announces while an attempt runs, read every ``preemption.poll_s`` through the backend and
sorted by ``supervisor.policy.preemption``: preemption notices for the loop, the rest said once.

A drain is sorted once per run: a node Ray drains takes nothing new, so a drain ignored for one attempt cannot
become the next one's notice. An outage of the read (the GCS restarting, a dropped connection) is ridden out,
logged when it begins and when it ends: the job goes on meanwhile, and a notice is seen at the next read that
answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from supervisor.backends.base import JobBackend, RunningJob
from supervisor.policy.preemption import Sorted, sort_drains

logger = logging.getLogger(__name__)


@dataclass
class PreemptionWatch:
    backend: JobBackend
    poll_s: float
    monotonic: Callable[[], float]
    own_drains: Collection[str]
    """The nodes the supervisor drained itself (kept by the loop, read at each look)."""
    sorted_nodes: set[str] = field(default_factory=set)
    next_read_at: float = 0.0
    unanswered: bool = False

    def due(self) -> bool:
        return self.monotonic() >= self.next_read_at

    def look(self, job: RunningJob, force: bool = False) -> Sorted:
        """The drains not sorted before, sorted (nothing when the last read is less than ``poll_s`` old, unless
        ``force``, or when the cluster did not answer)."""
        if not force and not self.due():
            return Sorted()
        self.next_read_at = self.monotonic() + self.poll_s
        try:
            draining = self.backend.draining_nodes()
            new = {node: deadline for node, deadline in draining.items() if node not in self.sorted_nodes}
            holding = self.backend.nodes_holding(job) if new else set()
        except Exception as exc:  # noqa: BLE001 - ridden out: the next read may answer
            if not self.unanswered:
                logger.warning("could not read which nodes Ray is draining (retrying every %g s): %s", self.poll_s, exc)
            self.unanswered = True
            return Sorted()
        if self.unanswered:
            logger.warning("Ray answers again on the draining nodes")
            self.unanswered = False
        self.sorted_nodes.update(new)
        return sort_drains(new, holding, self.own_drains)
