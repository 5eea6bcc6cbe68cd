"""The recovery benchmark runs and writes its outputs (timings are its business, not the suite's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

BENCH = REPO_ROOT / "scripts" / "bench_recovery.py"


def run_benchmark(out: Path, *args: str, timeout_s: float) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args, "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    results = out / "results.json"
    return proc, json.loads(results.read_text()) if results.exists() else {}


@pytest.mark.ray
@pytest.mark.slow  # about 100 s: beyond the default suite's budget; the benchmark is a script, not a feature
def test_benchmark_quick_mode_writes_its_outputs(tmp_path) -> None:
    """--quick's launchers and failure (the supervisor and a shell loop, raise), on a shorter job and without the
    fault-free references, to keep the suite fast."""
    proc, result = run_benchmark(tmp_path, "--quick", "--steps", "4", "--no-fault-free", timeout_s=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result["valid"] is True, result["problems"]
    runs = {run["launcher"]: run for run in result["runs"]}
    assert sorted(runs) == ["shell-loop", "supervisor"]
    for run in runs.values():
        metrics = run["metrics"]
        assert (run["failure"], run["cut_off"]) == ("raise", False)
        for key in ("detect_s", "old_cluster_stop_s", "relaunch_s", "new_cluster_start_s", "job_startup_s"):
            assert metrics[key] is not None, (run["launcher"], key)
        for key in ("first_step_s", "recover_s", "steps_redone", "time_lost_s"):
            assert metrics[key] is not None, (run["launcher"], key)
        # Every second of the recovery is in a named part: the benchmark's own check passed.
        assert metrics["adds_up"] is True, metrics["breakdown_problems"]
        assert metrics["leftover_processes"] == 0
        # The fault is at step 3, in the sync right after the save at step 3: no step is trained twice.
        assert metrics["steps_redone"] == 0
    supervisor, loop = runs["supervisor"]["metrics"], runs["shell-loop"]["metrics"]
    assert supervisor["new_cluster_start_s"] == supervisor["old_cluster_stop_s"] == 0.0, "its cluster is kept"
    assert supervisor["teardown_fence_s"] is not None
    assert supervisor["driver_exit_s"] is not None, "the error record arrives before the driver exits"
    assert supervisor["backoff_s"] is not None
    assert loop["new_cluster_start_s"] > 0, "a loop's attempt starts a cluster"
    assert loop["old_cluster_stop_s"] > 0, "and stops it"
    assert loop["teardown_fence_s"] is None, "a loop has no teardown of its own"
    assert loop["backoff_s"] is None, "nor a backoff"
    assert result["all_finished_runs_have_the_same_weights"] is True
    markdown = (tmp_path / "results.md").read_text()
    assert "## raise" in markdown
    assert "## What a failure costs" in markdown
    assert "not a valid comparison" not in markdown
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(2400)
def test_every_launcher_runs_the_job_without_a_fault(tmp_path) -> None:
    """A baseline that never reaches a training step (torchrun's variables reaching verl's workers once did
    exactly that) would make every comparison with it meaningless: each launcher's fault-free run must finish."""
    proc, result = run_benchmark(tmp_path, "--fault-free-only", "--steps", "3", "--limit-s", "300", timeout_s=2300)
    runs = {run["launcher"]: run for run in result.get("runs", [])}
    assert sorted(runs) == sorted(
        ["supervisor", "supervisor-fresh-cluster", "supervisor-cold-driver", "shell-loop", "torchrun", "kuberay-like"]
    ), proc.stderr[-3000:]
    not_finished = {
        name: (run["cut_off"], run["exit_code"], run["workdir"])
        for name, run in runs.items()
        if not run["metrics"]["finished"]
    }
    assert not not_finished, not_finished
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result["all_finished_runs_have_the_same_weights"] is True
