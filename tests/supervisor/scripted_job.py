"""A job for the supervisor's loop tests: behaviour chosen per attempt on the command line.

    python scripted_job.py [--fail-until N] [--exit-code C] [--ignore-sigterm] [--run-forever-on A]
                           [--spawn-stubborn-child]

It writes `ready` into its attempt's log folder once it is running, so that tests wait on that instead of
sleeping.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-until", type=int, default=0, help="attempts below this one fail")
    parser.add_argument("--exit-code", type=int, default=1)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--run-forever-on", type=int, action="append", default=[])
    parser.add_argument("--spawn-stubborn-child", action="store_true")
    args = parser.parse_args()
    attempt = int(os.environ["VERL_SUPERVISOR_ATTEMPT"])
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.spawn_stubborn_child:
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
        subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    Path(os.environ["VERL_SUPERVISOR_ERROR_FILE"]).with_name("ready").write_text(str(os.getpid()))
    print(f"scripted job: attempt {attempt}", flush=True)
    if attempt in args.run_forever_on:
        while True:
            time.sleep(1)
    sys.exit(args.exit_code if attempt < args.fail_until else 0)


if __name__ == "__main__":
    main()
