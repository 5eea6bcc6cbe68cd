"""The supervisor works from an installed package: the wheel carries the Hydra presets that live in conf/."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_the_wheel_carries_the_presets_and_composes_without_the_repository(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO_ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("verl_supervisor-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    # The wheel's packages first; run from a folder that is not the repository.
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "from supervisor import cli; print(cli.__file__); print(cli.builtin_config_dir())"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where == [str(site / "supervisor" / "cli.py"), str(site / "supervisor" / "conf")]
    composed = subprocess.run(
        [sys.executable, "-m", "supervisor", "--cfg", "job=verl_ppo", "run_dir=unused"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert composed.returncode == 0, composed.stderr
    assert "verl.trainer.main_ppo" in composed.stdout
    assert "weight-sync-failure" in composed.stdout, "the rules come with the packaged supervisor.yaml"
