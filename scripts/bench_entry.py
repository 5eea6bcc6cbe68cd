"""One attempt of the benchmark's job for the baseline launchers (a shell loop, torchrun).

It numbers the attempt (from the loop's counter, or torchrun's TORCHELASTIC_RESTART_COUNT) so that an injected
fault fires on attempt 1 only, and runs the job as a user would run verl, as a child, exiting with its code:
``python -m verl_hooks.launch -m mini_ppo.main <args>``. Like verl's own ``ray.init()``, each attempt
gets a Ray cluster of its own that ends with it; unlike it, the cluster has its own temp dir and ports (the
supervisor's mechanism, ``LocalRayCluster``), because a default local cluster takes Ray's fixed ports and the
shared /tmp/ray, and would collide with other clusters on a shared machine. It logs when the attempt starts,
when its cluster is up, and when it ends.

    BENCH_LAUNCH_LOG=<file> BENCH_RAY_DIR=<dir> python scripts/bench_entry.py <job args>
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from supervisor.mechanisms.ray_cluster import ClusterSpec, LocalRayCluster


def log(event: str, attempt: int, **fields: object) -> None:
    with open(os.environ["BENCH_LAUNCH_LOG"], "a") as f:
        f.write(json.dumps({"ts": time.time(), "event": event, "attempt": attempt, **fields}) + "\n")


def main() -> int:
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"]) + 1
    else:
        attempt = int(os.environ.get("BENCH_ATTEMPT", "1"))
    log("launch", attempt, pid=os.getpid())
    temp_dir = Path(os.environ["BENCH_RAY_DIR"]) / f"attempt-{attempt}"
    cluster = LocalRayCluster(ClusterSpec(temp_dir=temp_dir, num_cpus=8, dashboard=False))
    started = time.monotonic()
    try:
        cluster.start()
        log("cluster_up", attempt, startup_s=time.monotonic() - started)
        env = {**os.environ, **cluster.env(), "VERL_SUPERVISOR_ATTEMPT": str(attempt)}
        child = subprocess.run(
            [sys.executable, "-m", "verl_hooks.launch", "-m", "mini_ppo.main", *sys.argv[1:]],
            env=env,
            check=False,
        )
        log("exit", attempt, code=child.returncode)
        return child.returncode
    finally:
        cluster.stop(grace_s=5.0)
        if cluster.temp_dir is not None and cluster.temp_dir != temp_dir.resolve():
            shutil.rmtree(cluster.temp_dir, ignore_errors=True)  # the short stand-in for a long temp dir path


if __name__ == "__main__":
    sys.exit(main())
