"""One attempt of the benchmark's job for the baseline launchers (a shell loop, torchrun).

It numbers the attempt (from the loop's counter, or torchrun's TORCHELASTIC_RESTART_COUNT) so that an injected
fault fires on attempt 1 only, logs when the attempt starts and when it ends, and runs the job exactly as a user
would: ``python -m verl_hooks.launch -m verl_hooks.mini_ppo.main <args>``, as a child, exiting with its code.

    BENCH_LAUNCH_LOG=<file> python scripts/bench_entry.py <job args>
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def log(event: str, attempt: int, **fields: object) -> None:
    with open(os.environ["BENCH_LAUNCH_LOG"], "a") as f:
        f.write(json.dumps({"ts": time.time(), "event": event, "attempt": attempt, **fields}) + "\n")


def main() -> int:
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"]) + 1
    else:
        attempt = int(os.environ.get("BENCH_ATTEMPT", "1"))
    env = {**os.environ, "VERL_SUPERVISOR_ATTEMPT": str(attempt)}
    log("launch", attempt, pid=os.getpid())
    child = subprocess.run(
        [sys.executable, "-m", "verl_hooks.launch", "-m", "verl_hooks.mini_ppo.main", *sys.argv[1:]],
        env=env,
        check=False,
    )
    log("exit", attempt, code=child.returncode)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
