"""The recovery benchmark runs and writes its outputs (timings are its business, not the suite's)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.ray
def test_benchmark_quick_mode_writes_its_outputs(tmp_path) -> None:
    """--quick's launchers and failure (the supervisor and a shell loop, raise), on a shorter job and without the
    fault-free references, to keep the suite fast."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "bench_recovery.py"),
            "--quick",
            "--steps",
            "4",
            "--no-fault-free",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    runs = {run["launcher"]: run for run in result["runs"]}
    assert sorted(runs) == ["shell-loop", "supervisor"]
    for run in runs.values():
        assert (run["failure"], run["cut_off"]) == ("raise", False)
        for key in ("detection_s", "teardown_to_fence_s", "relaunch_to_first_step_s", "recover_s", "steps_lost"):
            assert run["metrics"][key] is not None, (run["launcher"], key)
        assert run["metrics"]["leftover_processes"] == 0
        # The fault is at step 3, in the sync right after the save at step 3: no step is trained twice.
        assert run["metrics"]["steps_lost"] == 0
    assert runs["supervisor"]["metrics"]["relaunch_cluster_start_s"] == 0.0, "its cluster is kept"
    assert runs["shell-loop"]["metrics"]["relaunch_cluster_start_s"] > 0, "a loop's attempt starts a cluster"
    assert result["all_finished_runs_have_the_same_weights"] is True
    assert "## raise" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"
