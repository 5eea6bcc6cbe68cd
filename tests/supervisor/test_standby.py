"""The standby driver: a real ``python -m verl_hooks.standby`` process, preloading a job module written by the
test, used as an attempt's driver or discarded."""

from __future__ import annotations

import os
import sys
import textwrap
import uuid
from pathlib import Path

import psutil
import pytest

from supervisor.backends.driver import DriverProcess, StandbyDriver, launcher_args, standby_module
from supervisor.mechanisms.marked import find_marked_processes
from supervisor.mechanisms.processes import REAP_TIMEOUT_S, wait_for
from verl_hooks.contract import ENV_ATTEMPT, ENV_RUN_ID
from verl_hooks.standby import NICENESS, top_level_imports

JOB = '''
"""A job that says which of its imports were already loaded before its body ran."""
import os
import sys
import json
preloaded = "json" in sys.modules and "standby_probe_dep" in sys.modules
from standby_probe_dep import VALUE
def helper():
    import tabnanny  # inside a function: not preloaded
if __name__ == "__main__":
    print("args", sys.argv[1:], "value", VALUE, "tabnanny", "tabnanny" in sys.modules, flush=True)
    print("niceness", os.getpriority(os.PRIO_PROCESS, 0), flush=True)
    raise SystemExit(int(sys.argv[1]))
'''


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    (tmp_path / "standby_probe_job.py").write_text(JOB)
    (tmp_path / "standby_probe_dep.py").write_text("VALUE = 42\n")
    return tmp_path


def env_for(job_dir: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{job_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_top_level_imports_are_found_without_running_the_module(job_dir: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(job_dir))
    names = top_level_imports("standby_probe_job")
    assert names[:4] == ["os", "sys", "json", "standby_probe_dep"]
    assert "standby_probe_dep.VALUE" in names, "a from-import's names are tried as submodules too"
    assert "tabnanny" not in names, "imports inside functions are not preloaded"
    assert "standby_probe_job" not in sys.modules, "the module itself was not imported"
    relative = top_level_imports("supervisor.backends.child_driver")
    assert "supervisor.backends.base" in relative
    assert top_level_imports("no_such_module_anywhere") == []


def test_the_launchers_command_names_the_module_to_preload() -> None:
    argv = [sys.executable, "-m", "verl_hooks.launch", "-m", "mini_ppo.main", "trainer.x=1"]
    assert standby_module(argv) == "mini_ppo.main"
    assert launcher_args(argv) == ["-m", "mini_ppo.main", "trainer.x=1"]
    assert standby_module(["bash", "-c", "python train.py"]) is None, "a custom command gets no standby"
    assert standby_module([sys.executable, "-m", "verl_hooks.launch", "script.py"]) is None


def test_a_standby_becomes_the_attempts_driver_with_its_imports_done(job_dir: Path, tmp_path: Path) -> None:
    run_id = uuid.uuid4().hex
    env = env_for(job_dir)
    standby = StandbyDriver(sys.executable, "standby_probe_job", env, str(job_dir), run_id, attempt=2)
    try:
        assert [p.pid for p in find_marked_processes({ENV_RUN_ID: run_id, ENV_ATTEMPT: "2"})] == [standby.pid]
        own = os.getpriority(os.PRIO_PROCESS, 0)
        assert wait_for(lambda: psutil.Process(standby.pid).nice() == min(19, own + NICENESS), 30), "it waits aside"
        assert find_marked_processes({ENV_RUN_ID: run_id, ENV_ATTEMPT: "1"}) == [], "not the running attempt's"
        assert standby.fits(2, env, str(job_dir))
        assert not standby.fits(3, env, str(job_dir))
        assert not standby.fits(2, {**env, "RAY_ADDRESS": "127.0.0.1:1"}, str(job_dir)), "another cluster"
        assert not standby.fits(2, env, str(tmp_path / "elsewhere"))

        argv = [sys.executable, "-m", "verl_hooks.launch", "-m", "standby_probe_job", "3", "x=1"]
        log_dir = tmp_path / "attempt"
        log_dir.mkdir()
        driver = DriverProcess(argv, env, str(job_dir), log_dir, run_id, 2, echo=False, standby=standby)
        assert driver.warm
        assert driver.pid == standby.pid
        status = driver.wait(60)
        driver.join_output(5)
    finally:
        standby.discard(grace_s=1.0, reap_timeout_s=REAP_TIMEOUT_S)
    assert status is not None
    assert status.code == 3, (log_dir / "stderr.log").read_text()[-2000:]
    out = (log_dir / "stdout.log").read_text()
    assert "args ['3', 'x=1'] value 42 tabnanny False" in out
    assert f"niceness {own}" in out, "the driver runs at the attempt's priority (the tests may raise it back)"
    assert "verl_hooks.standby: ready, " in (log_dir / "stderr.log").read_text(), "it says what it preloaded"


def test_a_discarded_standby_exits_without_running_anything(job_dir: Path) -> None:
    run_id = uuid.uuid4().hex
    standby = StandbyDriver(sys.executable, "standby_probe_job", env_for(job_dir), str(job_dir), run_id, attempt=4)
    process = psutil.Process(standby.pid)
    standby.discard(grace_s=30.0, reap_timeout_s=REAP_TIMEOUT_S)
    assert standby.child.poll() is not None
    assert standby.child.poll().code == 0, "end of input: a clean exit, not a kill"
    assert not process.is_running()
    assert find_marked_processes({ENV_RUN_ID: run_id}) == []
    assert not standby.fits(4, env_for(job_dir), str(job_dir)), "a dead standby fits nothing"


def test_a_standby_that_ignores_end_of_input_is_ended_by_signal(tmp_path: Path) -> None:
    (tmp_path / "standby_stuck_job.py").write_text(
        textwrap.dedent(
            """
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(600)  # an import that never returns
            """
        )
    )
    (tmp_path / "standby_stuck_main.py").write_text("import standby_stuck_job\n")
    run_id = uuid.uuid4().hex
    standby = StandbyDriver(sys.executable, "standby_stuck_main", env_for(tmp_path), str(tmp_path), run_id, 2)
    standby.discard(grace_s=0.5, reap_timeout_s=REAP_TIMEOUT_S)
    assert standby.child.poll() is not None
    assert find_marked_processes({ENV_RUN_ID: run_id}) == []
