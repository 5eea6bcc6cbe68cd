"""The recovery benchmark runs and writes its outputs (timings are its business, not the suite's)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.ray
def test_benchmark_quick_run_writes_its_outputs(tmp_path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "bench_recovery.py"),
            "--launchers",
            "supervisor",
            "--failures",
            "raise",
            "--repeats",
            "1",
            "--steps",
            "4",
            "--no-fault-free",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    (run,) = result["runs"]
    assert (run["launcher"], run["failure"], run["cut_off"]) == ("supervisor", "raise", False)
    for key in ("detection_s", "teardown_to_fence_s", "relaunch_to_first_step_s", "recover_s", "steps_lost"):
        assert run["metrics"][key] is not None, key
    assert run["metrics"]["leftover_processes"] == 0
    assert "## raise" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"
