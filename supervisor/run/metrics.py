"""Prometheus metrics of a run (``metrics.port``), served by ``prometheus_client`` on a port of its own.

Each scrape reads the run's status from its run directory (``supervisor.run.status``), so the metrics say what
``verl-supervisor status`` says and need nothing from the loop. The endpoint only answers GETs; it listens on
loopback unless ``metrics.host`` says otherwise (a pod's address for a PodMonitor).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from supervisor.run.history import RunState
from supervisor.run.status import NotARunDirectory, StatusReader

PREFIX = "verl_supervisor"


class RunCollector(Collector):
    def __init__(self, run_dir: Path) -> None:
        self.reader = StatusReader(run_dir)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            status = self.reader.read(time.time())
        except NotARunDirectory:
            return  # scraped before the run's first state was written

        run = [status.run_id]

        restarts = CounterMetricFamily(
            f"{PREFIX}_restarts",
            "Restarts of the job, by the rule that classified the failed attempt",
            labels=["run_id", "rule"],
        )
        for rule, count in sorted(status.restarts_by_rule.items()):
            restarts.add_metric([status.run_id, rule], count)
        yield restarts

        attempts = CounterMetricFamily(f"{PREFIX}_attempts", "Attempts started", labels=["run_id"])
        attempts.add_metric(run, len(status.attempts))
        yield attempts

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["run_id"])
            family.add_metric(run, math.nan if value is None else value)
            return family

        yield gauge("attempt_running", "1 while an attempt of the job runs", 1 if status.in_flight else 0)
        step = status.resume_step if status.resume_step is not None else status.newest_checkpoint_step
        yield gauge("checkpoint_step", "The newest complete checkpoint step (NaN: none yet)", step)
        yield gauge(
            "seconds_since_progress",
            "Seconds since the running attempt last made progress (a weight sync); NaN when none runs",
            status.seconds_since_progress,
        )
        yield gauge("lost_seconds", "Wall time lost to failures (docs/operating.md)", status.lost_s)
        yield gauge("restarts_left", "Restarts the budget still allows", status.restarts_left)
        yield gauge("exit_code", "The supervisor's exit code once the run finished (NaN before)", status.exit_code)
        yield gauge(
            "unhealthy_nodes",
            "Nodes whose last health check after a failure found them unhealthy",
            len(status.unhealthy_nodes),
        )
        yield gauge(
            "excluded_nodes", "Nodes drained in Ray so that no attempt lands there again", len(status.excluded_nodes)
        )

        state = GaugeMetricFamily(f"{PREFIX}_state", "1 for the run's current state", labels=["run_id", "state"])
        for value in RunState:
            state.add_metric([status.run_id, value.value], 1 if status.state == value.value else 0)
        yield state


@dataclass
class MetricsServer:
    url: str
    _server: object

    def stop(self) -> None:
        self._server.shutdown()  # type: ignore[attr-defined]
        self._server.server_close()  # type: ignore[attr-defined]


def serve_metrics(run_dir: Path, host: str, port: int) -> MetricsServer:
    """Serves the run's metrics at ``http://host:port/metrics`` (port 0: a free one, named in the URL)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(run_dir))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound_host, bound_port = server.server_address[:2]
    return MetricsServer(f"http://{bound_host}:{bound_port}/metrics", server)
