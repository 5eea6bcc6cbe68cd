"""A job for the supervisor's loop tests: behaviour chosen per attempt on the command line.

    python -m tests.supervisor.e2e.scripted_job [--fail-until N] [--exit-code C] [--ignore-sigterm]
        [--run-forever-on A] [--spawn-stubborn-child] [--leave-detached-actor-on A] [--unmarked-group-child-on A]
        [--orphan-helper-on A] [--leave-detached-placement-group-on A --gpus G] [--need-gpus G]
        [--hold-gpus-in-another-job-on A]
        [--steps N --step-time S [--stall-on A --stall-at K] [--slow-after K --slow-step-time S]]
        [--until-file PATH] [--ping-ray]

With --steps it behaves like a verl job as the supervisor sees it: it sends the weight-sync guard's heartbeats
(sync_begin, sync_phase, sync_end) once per step and the driver's alive beats, and on --stall-on attempts it
stops at step --stall-at inside a function whose name the stack dump must show.

It writes `ready` into its attempt's log folder once it is running (when the folder is on this machine), so
that tests wait on that instead of sleeping.
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
    parser.add_argument("--leave-detached-actor-on", type=int, action="append", default=[])
    parser.add_argument("--unmarked-group-child-on", type=int, action="append", default=[])
    parser.add_argument("--orphan-helper-on", type=int, action="append", default=[])
    parser.add_argument("--leave-detached-placement-group-on", type=int, action="append", default=[])
    parser.add_argument("--hold-gpus-in-another-job-on", type=int, action="append", default=[])
    parser.add_argument("--gpus", type=float, default=1, help="the GPUs the detached placement group reserves")
    parser.add_argument("--need-gpus", type=float, default=0, help="reserve these GPUs (30 s at most) or exit 3")
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--step-time", type=float, default=0.2)
    parser.add_argument("--stall-on", type=int, action="append", default=[])
    parser.add_argument("--stall-at", type=int, default=0)
    parser.add_argument("--slow-after", type=int, default=0)
    parser.add_argument("--until-file", type=Path, help="run until this file exists, then exit 0")
    parser.add_argument("--ping-ray", action="store_true", help="run one task on the cluster ($RAY_ADDRESS)")
    parser.add_argument("--slow-step-time", type=float, default=0.0)
    args = parser.parse_args()
    attempt = int(os.environ["VERL_SUPERVISOR_ATTEMPT"])
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.spawn_stubborn_child:
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
        subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    if "VERL_SUPERVISOR_ERROR_FILE" in os.environ:  # not with ray.mode=jobs: the driver may be elsewhere
        Path(os.environ["VERL_SUPERVISOR_ERROR_FILE"]).with_name("ready").write_text(str(os.getpid()))
    print(f"scripted job: attempt {attempt}", flush=True)
    if attempt in args.leave_detached_actor_on:
        leave_a_detached_actor(attempt)
    if attempt in args.leave_detached_placement_group_on:
        leave_a_detached_placement_group(attempt, args.gpus)
    if attempt in args.hold_gpus_in_another_job_on:
        hold_gpus_in_another_job(args.gpus)
    if args.need_gpus and attempt not in args.leave_detached_placement_group_on:
        reserve_gpus(args.need_gpus)
    if attempt in args.orphan_helper_on:
        orphan_a_helper(Path(os.environ["VERL_SUPERVISOR_ERROR_FILE"]).with_name("orphan.pid"))
    if attempt in args.unmarked_group_child_on:
        leave_an_unmarked_child_in_the_group(Path(os.environ["VERL_SUPERVISOR_ERROR_FILE"]).with_name("group-child"))
    if attempt in args.run_forever_on:
        while True:
            time.sleep(1)
    if args.ping_ray:
        import ray

        ray.init(log_to_driver=False)  # RAY_ADDRESS, and the credentials the supervisor passed on
        print(f"scripted job: ray says {ray.get(ray.remote(lambda: 'pong').remote())}", flush=True)
    if args.until_file is not None:
        while not args.until_file.exists():  # the test's own signal that it is done looking at the live run
            time.sleep(0.1)
    if args.steps:
        train_with_heartbeats(args, attempt)
    sys.exit(args.exit_code if attempt < args.fail_until else 0)


def train_with_heartbeats(args: argparse.Namespace, attempt: int) -> None:
    from verl_hooks import heartbeat
    from verl_hooks.contract import HeartbeatKind

    heartbeat.enable_stack_dumps()
    heartbeat.start_alive_beats()
    for step in range(1, args.steps + 1):
        if attempt in args.stall_on and step == args.stall_at:
            wait_for_a_reply_that_never_comes()
        time.sleep(args.slow_step_time if args.slow_after and step > args.slow_after else args.step_time)
        heartbeat.beat(HeartbeatKind.SYNC_BEGIN, step=step, backend="scripted")
        heartbeat.beat(HeartbeatKind.SYNC_PHASE, step=step, phase="update_weights")
        heartbeat.beat(HeartbeatKind.SYNC_END, step=step, duration_s=0.01)
        print(f"scripted job: step {step}", flush=True)
    time.sleep(0.5)  # let the last beats leave before the process exits


class Stubborn:
    """An actor that outlives its job: detached, unnamed (no handle and no name to kill it by once the job is
    gone), and deaf to SIGTERM."""

    def __init__(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def ping(self) -> str:
        return f"pid {os.getpid()}, SUBMITTED_BY={os.environ.get('SUBMITTED_BY')}"


def leave_a_detached_actor(attempt: int) -> None:
    """Leave a Stubborn actor on a node with the `stray_ok` resource (the test cluster's non-head node).

    Its process drops the run's marker: on a real cluster it would run on another machine, out of reach of the
    supervisor's process sweep, and only the fence's kill by id through the GCS can end it.
    """
    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    elsewhere = {"env_vars": {"VERL_SUPERVISOR_RUN_ID": "", "VERL_SUPERVISOR_ATTEMPT": ""}}
    remote = ray.remote(num_cpus=0, resources={"stray_ok": 0.01}, runtime_env=elsewhere)(Stubborn)
    actor = remote.options(lifetime="detached").remote()
    print(f"scripted job: detached actor in {ray.get(actor.ping.remote())}", flush=True)


def leave_a_detached_placement_group(attempt: int, gpus: float) -> None:
    """Reserve ``gpus`` in a detached placement group and leave it behind, as a verl job whose resource pool
    outlives its driver would: the GPUs stay reserved after the job is gone."""
    import ray
    from ray.util.placement_group import placement_group

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    group = placement_group([{"GPU": gpus}], name=f"leaked-by-attempt-{attempt}", lifetime="detached")
    ray.get(group.ready(), timeout=60)
    print(f"scripted job: detached placement group holding {gpus:g} GPUs", flush=True)


def hold_gpus_in_another_job(gpus: float) -> None:
    """A second Ray driver, started by the job but not marked as the run's (a tool of the job's own), reserves
    ``gpus`` in a detached placement group and exits: the group belongs to another Ray job than the attempt's,
    so only the fence's check of the cluster's free GPUs sees that they are still taken."""
    code = (
        "import os, ray\n"
        "from ray.util.placement_group import placement_group\n"
        "ray.init(address=os.environ['RAY_ADDRESS'], log_to_driver=False)\n"
        f"group = placement_group([{{'GPU': {gpus}}}], name='held-by-another-job', lifetime='detached')\n"
        "ray.get(group.ready(), timeout=60)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_SUPERVISOR_")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    print(f"scripted job: another Ray job holds {gpus:g} GPUs", flush=True)


def reserve_gpus(gpus: float) -> None:
    """What the next attempt's workers do first: reserve their GPUs. If a leaked group still holds them, this
    waits; after 30 s the job gives up with exit code 3."""
    import ray
    from ray.util.placement_group import placement_group

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    group = placement_group([{"GPU": gpus}])
    ready, _ = ray.wait([group.ready()], timeout=30)
    if not ready:
        print(f"scripted job: {gpus:g} GPUs never became free", flush=True)
        sys.exit(3)
    print(f"scripted job: reserved {gpus:g} GPUs", flush=True)


def leave_an_unmarked_child_in_the_group(report: Path) -> None:
    """A child in the driver's process group without the run's marker (a tool that cleans its environment):
    only a signal to the group reaches it. It writes which signal ended it."""
    code = (
        "import pathlib, signal, sys, time\n"
        "def stop(signum, frame):\n"
        "    pathlib.Path(sys.argv[1]).write_text(signal.Signals(signum).name)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(3600)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_SUPERVISOR_")}
    child = subprocess.Popen([sys.executable, "-c", code, str(report)], env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    child.stdout.readline()  # its handler is in place


def wait_for_a_reply_that_never_comes() -> None:
    while True:
        time.sleep(1)


def orphan_a_helper(pid_file: Path) -> None:
    """What some libraries and launch scripts do: a helper with a fresh environment (no marker), in a session
    of its own, whose parent exits at once (nobody's descendant); it writes its pid to ``pid_file``."""
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\n"
        "    os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
        "    time.sleep(3600)\n"
        "os._exit(0)\n"
    )
    fresh = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    subprocess.Popen([sys.executable, "-c", code, str(pid_file)], env=fresh, start_new_session=True).wait()
    while not pid_file.exists():
        time.sleep(0.01)


if __name__ == "__main__":
    main()
