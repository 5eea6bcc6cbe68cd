"""What Ray announces of its nodes while a run goes on: the drains read every ``preemption.poll_s`` through the
backend and sorted by ``supervisor.policy.preemption`` into preemption notices for the loop (the others said
once), and, after a preemption, the wait for the nodes left to hold the job again.

A drain is sorted once per run: a node Ray drains takes nothing new, so a drain ignored for one attempt cannot
become the next one's notice. An outage of the read (the GCS restarting, a dropped connection) is ridden out,
logged when it begins and when it ends: the job goes on meanwhile, and a notice is seen at the next read that
answers. The loop decides what a notice means for the attempt (``Supervisor._on_preemption``); this module only
reads, says and waits.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from supervisor.backends.base import JobBackend, RunningJob
from supervisor.clock import Clock
from supervisor.policy import nodes, preemption
from supervisor.policy.judgement import AwaitCapacity, Capacity
from supervisor.policy.preemption import AskToSave, Drain, Sorted, sort_drains
from supervisor.run.events import CapacityShort, CapacityWait, DrainIgnored, EventLog, PreemptionNotice
from supervisor.stop_signals import StopSignals

logger = logging.getLogger(__name__)


@dataclass
class PreemptionWatch:
    backend: JobBackend
    poll_s: float
    clock: Clock
    events: EventLog
    own_drains: Collection[str]
    """The nodes the supervisor drained itself (kept by the loop, read at each look)."""
    sorted_nodes: set[str] = field(default_factory=set)
    next_read_at: float = 0.0
    unanswered: bool = False

    def look(self, job: RunningJob) -> Sorted:
        """The drains not sorted before, sorted (nothing when the last read is less than ``poll_s`` old, or when
        the cluster did not answer)."""
        if self.clock.monotonic() < self.next_read_at:
            return Sorted()
        self.next_read_at = self.clock.monotonic() + self.poll_s
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

    def notices(self, job: RunningJob) -> tuple[Drain, ...]:
        """The preemption notices since the last look; a drain of a node the attempt does not use is said once
        (the supervisor's own drains were said as ``node_excluded``)."""
        found = self.look(job)
        ignored = [(drain, why) for drain, why in found.ignored if why != preemption.OUR_OWN]
        names = self.hostnames() if ignored else {}
        for drain, why in ignored:
            deadline = drain.deadline_ms / 1000 if drain.deadline_ms else None
            self.events.emit(DrainIgnored(job.attempt, drain.node_id, names.get(drain.node_id, ""), deadline, why))
        return found.notices

    def hostnames(self) -> dict[str, str]:
        try:
            return {node.node_id: node.hostname for node in self.backend.cluster_nodes()}
        except Exception:  # noqa: BLE001 - only for messages
            return {}

    def now_ms(self) -> int:
        return int(self.clock.now() * 1000)

    def say_notice(self, attempt: int, drains: Sequence[Drain], response: preemption.Response) -> None:
        names, now_ms = self.hostnames(), self.now_ms()
        deadline_ms = preemption.earliest_deadline_ms(drains)
        asked = isinstance(response, AskToSave)
        self.events.emit(
            PreemptionNotice(
                attempt,
                [
                    {
                        "node_id": d.node_id,
                        "hostname": names.get(d.node_id, ""),
                        "deadline": d.deadline_ms / 1000 if d.deadline_ms else None,
                    }
                    for d in drains
                ],
                None if deadline_ms is None else round((deadline_ms - now_ms) / 1000, 3),
                "save" if asked else "end_now",
                round(response.window_s, 3) if isinstance(response, AskToSave) else 0.0,
                "" if isinstance(response, AskToSave) else response.reason,
            )
        )

    def await_capacity(self, attempt: int, step: AwaitCapacity, signals: StopSignals) -> Capacity:
        """Wait (at most ``step.wait_s``, reading the cluster every ``poll_s``; a stop signal ends it) until the
        live nodes that are neither gone nor draining hold what the job reserved."""
        demand, started = dict(step.demand), self.clock.monotonic()
        missing, said = demand, False
        while True:
            try:
                with signals.deferred():
                    seen, draining = self.backend.cluster_nodes(), self.backend.draining_nodes()
                missing = nodes.shortfall(demand, seen, {*step.gone, *draining})
            except Exception as exc:  # noqa: BLE001 - the wait goes on; its end says what was short last
                logger.warning("the cluster's nodes could not be read: %s", exc)
            waited = self.clock.monotonic() - started
            if not missing or waited >= step.wait_s:
                break
            if not said:
                self.events.emit(CapacityShort(attempt, demand, missing, step.wait_s))
                said = True
            with signals.raising():
                self.clock.sleep(min(self.poll_s, step.wait_s - waited))
        capacity = Capacity(not missing, round(waited, 3), tuple(sorted(missing.items())))
        self.events.emit(CapacityWait(attempt, demand, capacity.waited_s, capacity.met, dict(capacity.missing)))
        return capacity
