"""Running the real supervisor as a process, and checking what it leaves behind.

After every test: no process of the test's runs is alive, and two bystanders the test session started outside
any run (a plain sleeper and a separate Ray cluster) are still alive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from supervisor.mechanisms.marked import find_marked_processes
from supervisor.mechanisms.processes import ProcessInfo
from supervisor.run.events import read_events
from tests.conftest import REPO_ROOT
from verl_hooks.contract import ENV_RUN_ID

TEST_CONFIG_DIR = REPO_ROOT / "tests" / "supervisor" / "e2e" / "conf"

# The mini-PPO job of the end-to-end tests (the reference digest depends on every one of these, the backend
# aside: both backends carry the same weights), as small as it gets: each of its Ray processes imports verl.
JOB_ARGS = ("trainer.total_training_steps=6", "trainer.save_freq=2", "seed=11", "trainer.n_workers=1")
# A whole run, then its teardown on SIGTERM, within pytest's 300 s: a run that never ends fails here, with what it
# said and wrote, rather than in pytest's timeout with nothing of the run to read.
RUN_TIMEOUT_S = 220
STOP_TIMEOUT_S = 40
# Quick restarts: the tests wait for real events, never for the backoff.
FAST = ("restart.backoff_initial_s=0.2", "restart.backoff_jitter_s=0", "teardown.grace_s=3")


def supervisor_argv(run_dir: Path, *overrides: str, job_args: tuple[str, ...] = ()) -> list[str]:
    argv = [sys.executable, "-m", "supervisor", "--config-dir", str(TEST_CONFIG_DIR), f"run_dir={run_dir}"]
    argv += list(overrides)
    if job_args:
        argv += ["--", *job_args]
    return argv


def supervisor_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VERL_HOOKS_", "VERL_SUPERVISOR_", "RAY_"))}
    return {**env, "PYTHONPATH": str(REPO_ROOT), **extra}


def run_supervisor(
    run_dir: Path,
    *overrides: str,
    job_args: tuple[str, ...] = (),
    extra_env: dict[str, str] | None = None,
    timeout_s: float = RUN_TIMEOUT_S,
):
    """The supervisor to its end. ``extra_env`` reaches the job too: it inherits the supervisor's environment.

    ``timeout_s`` stays under pytest's own timeout, so that a run that never ends is stopped here and the test
    fails with what the run said and wrote, instead of a stack of pytest's waiting thread."""
    argv = supervisor_argv(run_dir, *overrides, job_args=job_args)
    env = supervisor_env(**(extra_env or {}))
    with subprocess.Popen(
        argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the supervisor tears the attempt down on SIGTERM, and says where it was
            try:
                stdout, stderr = proc.communicate(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            raise AssertionError(
                f"the supervisor ran past {timeout_s} s and was stopped\n{describe_run(run_dir, stdout + stderr)}"
            ) from None
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def describe_run(run_dir: Path, output: str) -> str:
    """What a stuck run leaves to read: its events, the tail of each attempt's log, the supervisor's output."""
    parts = []
    events = run_dir / "events.jsonl"
    if events.exists():
        parts.append("events:\n" + events.read_text()[-6000:])
    for log in sorted(run_dir.glob("attempts/*/stdout.log")):
        parts.append(f"{log.relative_to(run_dir)}:\n" + log.read_text(errors="replace")[-3000:])
    parts.append("supervisor output:\n" + output[-6000:])
    return "\n".join(parts)


def run_supervisor_with_faults(
    run_dir: Path,
    faults: str,
    *overrides: str,
    job_args: tuple[str, ...] = JOB_ARGS,
    timeout_s: float = RUN_TIMEOUT_S,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """The supervisor with FAST restarts, the job with ``VERL_HOOKS_FAULTS`` (``PHASE:ACTION@STEP#ATTEMPT``)."""
    extra_env = {"VERL_HOOKS_FAULTS": faults, **env}
    return run_supervisor(run_dir, *FAST, *overrides, job_args=job_args, extra_env=extra_env, timeout_s=timeout_s)


def start_supervisor(
    run_dir: Path, *overrides: str, job_args: tuple[str, ...] = (), extra_env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    log = (run_dir.parent / f"{run_dir.name}.supervisor.log").open("w")
    return subprocess.Popen(
        supervisor_argv(run_dir, *overrides, job_args=job_args),
        cwd=REPO_ROOT,
        env=supervisor_env(**(extra_env or {})),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> object:
    """Wait for a real condition (a file, an event, a process gone), failing the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def events_of(run_dir: Path, kind: str | None = None) -> list[dict]:
    events = read_events(run_dir / "events.jsonl")
    return [e for e in events if kind is None or e["event"] == kind]


def state_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


@pytest.fixture(scope="session")
def reference(ray_cluster, tmp_path_factory, worker_id: str) -> dict:
    """final.json of an uninterrupted run of JOB_ARGS, and its checkpoints as a template. Run once per test
    session: the xdist workers share it (the first to need it runs it, the others wait for it)."""
    from tests.mini_ppo.harness import run_job

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if worker_id != "master" else base) / "mini_reference"
    with FileLock(f"{shared}.lock"):
        done = shared / "final.json"
        if not done.exists():
            shared.mkdir(exist_ok=True)
            run = run_job(ray_cluster, shared / "checkpoints", *JOB_ARGS)
            assert run.returncode == 0, run.output[-3000:]
            done.write_text(json.dumps(run.final()))
    return {"final": json.loads(done.read_text()), "checkpoints": shared / "checkpoints"}


def final_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / "final.json").read_text())


class RunTracker:
    """The run directories a test used, to check afterwards that none of their processes survived."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.run_dirs: list[Path] = []

    def new(self, name: str = "run") -> Path:
        path = self.base / name
        self.run_dirs.append(path)
        return path

    def leftovers(self) -> list:
        found = []
        for run_dir in self.run_dirs:
            state = run_dir / "state.json"
            if state.exists():
                run_id = json.loads(state.read_text())["run_id"]
                found += find_marked_processes({ENV_RUN_ID: run_id})
        return found


@pytest.fixture(scope="session")
def bystander_sleeper() -> Iterator[subprocess.Popen[bytes]]:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(86400)"])
    try:
        yield sleeper
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.fixture
def runs(tmp_path: Path, bystander_sleeper, ray_cluster) -> Iterator[RunTracker]:
    tracker = RunTracker(tmp_path)
    yield tracker
    try:
        wait_until(lambda: not tracker.leftovers(), 10, "the run's processes to be gone")
    except AssertionError:
        survivors = [ProcessInfo.of(p) for p in tracker.leftovers()]
        raise AssertionError(f"processes of the run survived it: {survivors}") from None
    for run_dir in tracker.run_dirs:
        # Long pytest paths put the cluster's temp dir under /tmp, linked from the run until the cluster's stop
        # moves it home; a supervisor killed outright leaves the link, and the dir is still the test's own.
        for link in (run_dir / "ray").glob("vsray-*"):
            if link.is_symlink():
                shutil.rmtree(link.resolve(), ignore_errors=True)
    assert bystander_sleeper.poll() is None, "a process outside the run was killed"
    assert ray_cluster.is_healthy(), "a Ray cluster outside the run was harmed"
