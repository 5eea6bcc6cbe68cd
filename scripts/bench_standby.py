"""What the standby driver (``restart.warm_standby``) saves a relaunch, for a given job module.

    .venv/bin/python scripts/bench_standby.py                                  # verl.trainer.main_ppo, 3 repeats
    .venv/bin/python scripts/bench_standby.py --module mini_ppo.main --repeats 5

The recovery benchmark's job (mini-PPO) imports little in its driver, so there the standby's gain is lost in the
noise of the job's Ray workers starting. A verl driver imports torch, Ray and verl before its ``main`` runs. This
measures, side by side in one run, the time from "launch the driver" to the job's ``main`` having run, for a
driver started cold (``python -m verl_hooks.launch -m MODULE --help``, what a relaunch does without a standby)
and for a standby that was started ahead and had finished its imports (the command sent on its stdin, what a
relaunch does with one). ``--help`` makes Hydra compose the job's configuration, print it and exit: the job's
``main`` ran, and nothing connects to a cluster. Medians over the repeats; the ratio is warm / cold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cold(module: str, env: dict[str, str]) -> float:
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "verl_hooks.launch", "-m", module, "--help"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    return time.monotonic() - started


def warm(module: str, env: dict[str, str]) -> tuple[float, float]:
    """(seconds from the command to the exit, seconds the standby took to get ready)."""
    started = time.monotonic()
    standby = subprocess.Popen(
        [sys.executable, "-m", "verl_hooks.standby", module],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert standby.stdin is not None
    assert standby.stderr is not None
    for line in standby.stderr:  # its readiness line comes after the imports' own warnings
        if line.startswith("verl_hooks.standby: ready"):
            break
    ready_s = time.monotonic() - started
    sent = time.monotonic()
    standby.stdin.write(json.dumps({"argv": ["-m", module, "--help"], "cwd": None}) + "\n")
    standby.stdin.close()
    standby.stderr.close()
    code = standby.wait()
    if code != 0:
        raise RuntimeError(f"the standby's job exited {code}")
    return time.monotonic() - sent, ready_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", default="verl.trainer.main_ppo")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    colds, warms, readies = [], [], []
    for repeat in range(args.repeats):  # interleaved, so that a slower spell of the machine hits both
        colds.append(cold(args.module, env))
        warm_s, ready_s = warm(args.module, env)
        warms.append(warm_s)
        readies.append(ready_s)
        print(f"repeat {repeat}: cold {colds[-1]:.2f} s, standby {warm_s:.2f} s (ready after {ready_s:.2f} s)")
    cold_s, warm_s = statistics.median(colds), statistics.median(warms)
    print(
        f"{args.module}: launch to main done, median of {args.repeats}: cold {cold_s:.2f} s, "
        f"standby {warm_s:.2f} s: {warm_s / cold_s:.2f}x ({cold_s - warm_s:.2f} s saved per relaunch); "
        f"the standby's own imports took {statistics.median(readies):.2f} s while the attempt before trained"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
