"""Which nodes the next attempt must not land on, and whether what is left can hold the job: pure functions.

After a failed attempt, each node it used is judged from what the probe read there (``gpu_health``): a GPU that
NVML cannot reach, uncorrectable ECC errors since the last look (volatile counters: they only grow until the
driver reloads), pages waiting to be retired, a row-remapping failure, hardware slowdown, or a compute check that
failed or hung. A node is also excluded when it was named as the place of the failure on two attempts in a row
(the error record's host; a node id in its message, as Ray's ``NodeDiedError`` gives it): a fault that follows a
machine is the machine's. Never the head (it holds the cluster's GCS: draining it would stop the cluster), never
a node the attempt did not use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from supervisor.mechanisms.gpu_health import GpuReading, NodeReading
from supervisor.mechanisms.ray_state import NodeInfo

NODE_ID = re.compile(r"\b[0-9a-f]{56}\b")
"""A Ray node id as its messages print it (28 bytes, hex)."""


@dataclass(frozen=True)
class NodeHealth:
    """One node's verdict."""

    node_id: str
    hostname: str
    problems: tuple[str, ...] = ()
    checked: str = ""
    """What was read (``3 GPUs``), or why nothing was (``no NVIDIA driver here``)."""

    @property
    def healthy(self) -> bool:
        return not self.problems


def gpu_problems(gpu: GpuReading, last: GpuReading | None) -> list[str]:
    """What is wrong with one GPU, ``last`` being the previous look at it (None: never looked at before)."""
    name = f"GPU {gpu.index}"
    if gpu.unreachable is not None:
        return [f"{name} unreachable through NVML ({gpu.unreachable})"]
    problems = []
    before = (last.ecc_uncorrected_volatile if last is not None else None) or 0
    if gpu.ecc_uncorrected_volatile is not None and gpu.ecc_uncorrected_volatile > before:
        since = "since the last look" if last is not None else "since the driver loaded"
        problems.append(f"{name}: {gpu.ecc_uncorrected_volatile - before} uncorrectable ECC error(s) {since}")
    if gpu.retired_pages_pending:
        problems.append(f"{name}: retired pages pending (a reset is due)")
    if gpu.remap_failure:
        problems.append(f"{name}: row remapping failed")
    if gpu.slowdown:
        problems.append(f"{name}: {', '.join(gpu.slowdown)}")
    if gpu.compute is not None:
        problems.append(f"{name}: compute check: {gpu.compute}")
    return problems


def judge_node(node_id: str, hostname: str, reading: NodeReading, last: NodeReading | None) -> NodeHealth:
    if reading.skipped is not None:
        return NodeHealth(node_id, hostname, checked=f"GPUs not read: {reading.skipped}")
    before = {gpu.index: gpu for gpu in (last.gpus if last is not None and last.skipped is None else ())}
    problems = [problem for gpu in reading.gpus for problem in gpu_problems(gpu, before.get(gpu.index))]
    checked = f"{len(reading.gpus)} GPU(s)" + (
        f", compute check skipped: {reading.compute_skipped}" * bool(reading.compute_skipped)
    )
    return NodeHealth(node_id, hostname, tuple(problems), checked)


def dead_nodes(ran_on: Iterable[str], nodes: Iterable[NodeInfo]) -> list[NodeHealth]:
    """The nodes the attempt ran on that Ray says are dead: nothing new lands there, and the event says why."""
    info = {node.node_id: node for node in nodes}
    return [
        NodeHealth(
            node_id, info[node_id].hostname, (f"dead in Ray: {info[node_id].state_message or 'no reason given'}",)
        )
        for node_id in sorted(ran_on)
        if node_id in info and not info[node_id].alive
    ]


def failure_nodes(record_hostname: str | None, record_message: str | None, nodes: Iterable[NodeInfo]) -> set[str]:
    """The nodes an attempt's error record names as the place of its failure: node ids in its message, else its
    host where exactly one node of the cluster has that name or address (several nodes on one host name none)."""
    known = {node.node_id: node for node in nodes}
    named = {node_id for node_id in NODE_ID.findall(record_message or "") if node_id in known}
    if named or not record_hostname:
        return named
    on_host = [n.node_id for n in known.values() if record_hostname in (n.hostname, n.ip)]
    return set(on_host) if len(on_host) == 1 else set()


@dataclass(frozen=True)
class NodeFindings:
    """What was read of the nodes after the attempt was torn down (``supervisor.backends.base.NodesSeen``)."""

    health: tuple[NodeHealth, ...] = ()
    """The verdict on each node the attempt used, and on those it ran on that Ray says are dead."""
    used: frozenset[str] = frozenset()
    cluster: tuple[NodeInfo, ...] = ()
    """Every node of the cluster as Ray knows it (empty: one machine, or Ray did not say)."""
    demand: tuple[tuple[str, float], ...] = ()
    """What the attempt's placement groups reserved: what the next attempt needs."""
    single_machine: bool = False


def findings(
    readings: Sequence[tuple[str, str, NodeReading]],
    last: Mapping[str, NodeReading],
    ran_on: Iterable[str],
    cluster: Sequence[NodeInfo],
    demand: Mapping[str, float],
    single_machine: bool,
) -> NodeFindings:
    """The verdict on each node the attempt used, from its reading and the one before (``last``), and on the nodes
    it ran on that Ray says are dead."""
    used = frozenset(node_id for node_id, _, _ in readings)
    health = [judge_node(n, host, reading, last.get(n)) for n, host, reading in readings]
    health += dead_nodes(set(ran_on) - used, cluster)
    return NodeFindings(tuple(health), used, tuple(cluster), tuple(sorted(demand.items())), single_machine)


@dataclass(frozen=True)
class Exclusion:
    node_id: str
    hostname: str
    reason: str


def exclusions(
    health: Sequence[NodeHealth],
    failed_on: Sequence[set[str]],
    used: Iterable[str],
    nodes: Iterable[NodeInfo],
    already: Iterable[str] = (),
) -> list[Exclusion]:
    """The nodes to drain before the next attempt: unhealthy ones, and those named as the place of the failure
    of each of the last two attempts (``failed_on``: oldest first), among the nodes the attempt used that are
    alive, not the head and not drained already."""
    info = {node.node_id: node for node in nodes}
    candidates = {n for n in used if n in info and info[n].alive and not info[n].is_head} - set(already)
    found: dict[str, Exclusion] = {}
    for verdict in health:
        if verdict.node_id in candidates and not verdict.healthy:
            found[verdict.node_id] = Exclusion(verdict.node_id, verdict.hostname, "; ".join(verdict.problems))
    if len(failed_on) >= 2:
        for node_id in (failed_on[-1] & failed_on[-2]) & candidates:
            found.setdefault(
                node_id,
                Exclusion(node_id, info[node_id].hostname, "the place of the failure of the last two attempts"),
            )
    return sorted(found.values(), key=lambda e: e.node_id)


def shortfall(demand: Mapping[str, float], nodes: Iterable[NodeInfo], excluded: Iterable[str]) -> dict[str, float]:
    """The resources the job needs (its last attempt's placement groups, summed) that the nodes left alive and
    not excluded no longer have in total: resource name to what is missing. Empty: it fits."""
    out = set(excluded)
    left: dict[str, float] = {}
    for node in nodes:
        if node.alive and node.node_id not in out and node.resources:
            for name, amount in node.resources.items():
                left[name] = left.get(name, 0.0) + amount
    return {name: need - left.get(name, 0.0) for name, need in demand.items() if need > left.get(name, 0.0) + 1e-9}


def unhealthy_machine(health: Sequence[NodeHealth]) -> str | None:
    """The embedded cluster's one machine: an unhealthy GPU there is a verdict, since every restart lands on it."""
    bad = [verdict for verdict in health if not verdict.healthy]
    if not bad:
        return None
    problems = "; ".join(problem for verdict in bad for problem in verdict.problems)
    return (
        f"this machine's hardware is unhealthy ({problems}): every restart of the embedded cluster would run on it. "
        f"Fix or replace the GPU (nvidia-smi -q shows the counters), or run on a cluster "
        f"(nodes.exclude=false restarts anyway)"
    )


def capacity_lost(missing: Mapping[str, float], demand: Mapping[str, float], drained: Sequence[Exclusion]) -> str:
    """Why the run stops before a relaunch: the nodes taken out, and what the job needs that is no longer there."""
    taken = "; ".join(f"{e.hostname}/{e.node_id[:8]} ({e.reason})" for e in drained) or "none this time"
    needs = ", ".join(f"{name} {demand[name]:g} ({lack:g} short)" for name, lack in sorted(missing.items()))
    return (
        f"the nodes left cannot hold the job: it reserved {needs} beyond what the live, undrained nodes have. "
        f"Taken out: {taken}. Add or repair nodes, then start the supervisor again on this run directory"
    )
