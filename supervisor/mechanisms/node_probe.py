"""Sweep the nodes of an attempt on a cluster of many machines: a Ray task pinned to each node runs ``node_scan``
there (ends the attempt's marked processes, asks NVML who still holds GPU memory) and answers.

Running a task takes a Ray driver, and the supervisor is none (it would be one more job on the user's cluster for
the whole run, and a Ray worker's memory in the supervisor). So the sweep is a short-lived process of its own,
``python -m supervisor.mechanisms.node_probe``: the request on stdin, one JSON answer on stdout. It asks for no
CPU (``num_cpus=0``): a node whose CPUs the next job already holds is swept all the same. A node that is dead in
Ray's view is not asked (nothing there can answer); a live node that does not answer in time is reported as such.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from supervisor.mechanisms.node_scan import NodeScan, scan_node
from verl_hooks.contract import ENV_ATTEMPT, ENV_RUN_ID, FORWARDED_ENV_PREFIXES

COMPUTE_CHECK_MAX_S = 30.0
"""The GPUs' compute check on a node (a child process importing torch, initialising CUDA, one small matmul per
device) takes seconds when healthy; past this it counts as hung."""
COMPUTE_CHECK_MIN_S = 10.0
COMPUTE_CHECK_MARGIN_S = 3.0
PROBE_OVERHEAD_S = 15.0
"""On top of a sweep's time limit, for the probe process's own start, Ray connection and shutdown: past it the
probe is killed and every node it was to scan counts as unanswered."""


@dataclass(frozen=True)
class NodeSweep:
    """What the sweep of an attempt's nodes found."""

    scans: list[NodeScan] = field(default_factory=list)
    unanswered: dict[str, str] = field(default_factory=dict)
    """Node id to why it did not answer (the probe could not start, the task failed or took too long)."""

    @property
    def clean(self) -> bool:
        return not self.unanswered and all(scan.clean for scan in self.scans)

    def summary(self) -> str:
        """One line for the teardown event: what was ended and what is still held, per node."""
        parts = []
        for scan in self.scans:
            where = f"node {scan.hostname}/{scan.node_id[:8]}"
            ended = ", ".join(f"{name}[{pid}]" for pid, name in scan.terminated)
            survivors = ", ".join(f"{name}[{pid}]" for pid, name in scan.survivors)
            line = f"{where}: GPU {scan.gpu.summary()}"
            if ended:
                line += f"; ended {ended}"
            if survivors:
                line += f"; still alive {survivors}"
            parts.append(line)
        parts += [f"node {node[:8]}: no answer ({why})" for node, why in self.unanswered.items()]
        return "; ".join(parts) or "no node to sweep"


def probe_env(environ: Mapping[str, str], auth: Mapping[str, str]) -> dict[str, str]:
    """The probe's environment: the supervisor's, without any marker, with the cluster's auth variables."""
    # Not the run's or an attempt's marker: its scan would find the probe itself.
    env = {k: v for k, v in environ.items() if not k.startswith(FORWARDED_ENV_PREFIXES)}
    env.pop("RAY_ADDRESS", None)
    return {**env, **auth}


def sweep_nodes(
    gcs_address: str,
    env: Mapping[str, str],
    known_pids: Mapping[str, list[int]],
    markers: Mapping[str, str],
    timeout_s: float,
    grace_s: float,
) -> NodeSweep:
    """Scan each node of ``known_pids`` (node id to the attempt's pids there) for processes with ``markers``,
    within ``timeout_s``."""
    if not known_pids:
        return NodeSweep()
    request = {
        "address": gcs_address,
        "nodes": {node: list(pids) for node, pids in known_pids.items()},
        "markers": dict(markers),
        "grace_s": grace_s,
        "timeout_s": timeout_s,
    }
    try:
        done = subprocess.run(  # our own module, argv fixed
            [sys.executable, "-m", "supervisor.mechanisms.node_probe"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            env=dict(env),
            timeout=timeout_s + PROBE_OVERHEAD_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        took = timeout_s + PROBE_OVERHEAD_S
        return NodeSweep(unanswered={node: f"the probe took over {took:g} s" for node in known_pids})
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (done.stderr or "").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return NodeSweep(unanswered={node: f"the probe failed: {tail[0][:300]}" for node in known_pids})
    return NodeSweep(
        scans=[NodeScan.from_json(scan) for scan in answer["scans"]], unanswered=dict(answer["unanswered"])
    )


def attempt_sweeper(
    gcs_address: str, auth: Mapping[str, str], run_id: str, attempt: int, grace_s: float
) -> Callable[[Mapping[str, list[int]], float], NodeSweep]:
    """The fence's sweep of one attempt's nodes (``AttemptView.sweeper``)."""
    markers = {ENV_RUN_ID: run_id, ENV_ATTEMPT: str(attempt)}
    env = probe_env(os.environ, auth)
    return lambda known, timeout_s: sweep_nodes(gcs_address, env, known, markers, timeout_s, grace_s)


def _scan_task(markers: dict[str, str], known_pids: list[int], grace_s: float, compute_timeout_s: float) -> dict:
    import ray

    here = ray.get_runtime_context().get_node_id()  # where it ran, which the answer names: not where it was sent
    return scan_node(here, markers, known_pids, grace_s, compute_timeout_s).to_json()


def compute_check_time(timeout_s: float, grace_s: float) -> float:
    """What a scan may give its GPUs' compute check within a sweep of ``timeout_s``: what is left after the
    process sweep's two graces and a margin, at most ``COMPUTE_CHECK_MAX_S`` (0: no time for one)."""
    left = timeout_s - 2 * grace_s - COMPUTE_CHECK_MARGIN_S
    return min(COMPUTE_CHECK_MAX_S, left) if left >= COMPUTE_CHECK_MIN_S else 0.0


def main() -> int:
    request = json.load(sys.stdin)
    import ray
    import ray.cloudpickle
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from supervisor.mechanisms import gpu_health, gpu_memory, marked, node_scan

    for module in (marked, gpu_memory, gpu_health, node_scan):
        ray.cloudpickle.register_pickle_by_value(module)  # the nodes need not have the supervisor installed
    started = time.monotonic()
    ray.init(address=request["address"], log_to_driver=False, logging_level="ERROR")
    try:
        task = ray.remote(num_cpus=0, max_retries=0)(_scan_task)
        pending = {}
        for node, pids in request["nodes"].items():
            pinned = task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            compute_s = compute_check_time(request["timeout_s"], request["grace_s"])
            pending[pinned.remote(request["markers"], pids, request["grace_s"], compute_s)] = node
        # The tasks are sent: at least a second to hear from them, however long connecting took.
        remaining = max(1.0, request["timeout_s"] - (time.monotonic() - started))
        ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=remaining)
        scans, unanswered = [], {}
        for ref in ready:
            try:
                scans.append(ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - one node's failure is reported, the others still count
                unanswered[pending[ref]] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        for ref in late:
            unanswered[pending[ref]] = f"no answer within {request['timeout_s']:g} s"
            ray.cancel(ref, force=True)
        print(json.dumps({"scans": scans, "unanswered": unanswered}), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
