"""``verl-supervisor check`` on this machine's environment: the installed Ray and verl, examined for real."""

from __future__ import annotations

import subprocess
import sys

import pytest

from supervisor import check
from tests.conftest import REPO_ROOT


def test_check_reports_the_installed_ray_verl_and_nvml_and_exits_0_when_all_is_verified() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "check"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = {line[2:].split("  ", 1)[0].strip(): line for line in done.stdout.splitlines() if line[:2] in ("  ", "! ")}
    import ray
    import verl

    assert ray.__version__ in lines["ray"]
    assert "available (Ray 2.52+)" in lines["ray token authentication"]
    assert verl.__version__ in lines["verl"]
    assert "verified (verl 0.9.0, 0.9.1" in lines["verl update_weights"]
    assert "would be installed" in lines["weight-sync guard"]
    assert "NVML" in lines


def test_a_ray_without_token_authentication_is_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "_version", lambda package: "2.49.2" if package == "ray" else None)
    ray, token, *_ = check.check_ray()
    assert (ray.found, ray.ok) == ("2.49.2", True)
    assert token.ok is False
    assert "Ray 2.49.2 has no token authentication" in token.found


def test_a_verl_the_guard_would_refuse_is_a_problem_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """A verl whose update_weights body the guard was not verified against: the child process reports it."""
    script = (
        "import json, verl_hooks.compat as c\nc.VERIFIED_UPDATE_WEIGHTS.clear()\nprint(json.dumps(c.verl_report()))\n"
    )
    monkeypatch.setattr(check.subprocess, "run", _running_instead(script))
    findings = {f.what: f for f in check.check_verl()}
    assert findings["verl update_weights"].ok is False
    assert "NOT verified" in findings["verl update_weights"].found
    assert findings["weight-sync guard"].ok is False
    assert "is not one the guard was verified against" in findings["weight-sync guard"].found


def _running_instead(script: str):
    real_run = subprocess.run

    def run(argv, **kwargs):
        assert argv[1:] == ["-m", "verl_hooks.compat"]
        return real_run([sys.executable, "-c", script], cwd=REPO_ROOT, **kwargs)

    return run
